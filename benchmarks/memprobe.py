"""Child process: peak resident memory of a few training steps of one (library, method, model).

Run as `python -m benchmarks.memprobe --lib unipeft --model minilm --method lora_qv`; prints JSON.
The peak is the kernel's high-water mark (VmHWM), reset after the model is loaded, minus the
resident size at that point: what training adds on top of holding the model.
"""
from __future__ import annotations

import argparse
import gc
import json


STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
# After a reset VmHWM equals VmRSS up to the kernel's per-thread RSS counter lag (64 pages a thread);
# a gap larger than this means the write was accepted but did nothing.
RESET_SLACK_KB = 8 * 1024


class PeakResetError(RuntimeError):
    """The kernel's high-water mark (VmHWM) could not be reset: a peak would include earlier allocations."""


def _status(key: str) -> int:
    with open(STATUS) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    raise KeyError(key)


def reset_peak() -> int:
    """Reset the kernel's high-water mark to the current size; return that size (kB). PeakResetError if it fails."""
    gc.collect()
    # A failed reset is an error, not a warning: the peak would silently include everything the
    # process held before (e.g. model loading), and the figures built on it would be wrong.
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as exc:
        raise PeakResetError(
            f"cannot reset the peak resident size: writing '5' to {CLEAR_REFS} failed ({exc.strerror or exc}). "
            f"Memory probes need Linux >= 4.0 with /proc mounted read-write (a container with a read-only "
            f"/proc cannot run them): run the memory benchmarks on such a machine") from None
    rss, hwm = _status("VmRSS"), _status("VmHWM")
    if hwm - rss > RESET_SLACK_KB:
        raise PeakResetError(
            f"writing '5' to {CLEAR_REFS} did not reset the peak resident size (VmHWM {hwm} kB stays above "
            f"VmRSS {rss} kB); this kernel ignores the request, so memory probes cannot run on it")
    return rss


def peak_mb_since(rss0_kb: int) -> float:
    """Peak resident memory above `rss0_kb` since the last reset_peak(), in MB."""
    return round((_status("VmHWM") - rss0_kb) / 1024, 1)


def main() -> None:
    """Measure and print {"peak_mb": ..., "steps": ...}."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", choices=["unipeft", "peft", "bound"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import os

    import torch

    torch.set_num_threads(int(os.environ.get("UNIPEFT_BENCH_THREADS", torch.get_num_threads())))
    from .models import batch, loss_of
    from .peft_suite import adapted, bound_step

    torch.manual_seed(0)
    b = batch(args.model, args.batch, args.seq)
    if args.lib == "bound":
        step = bound_step(args.model, b)
    else:
        model = adapted(args.lib, args.model, args.method)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model, b).backward()
            opt.step()
    rss0 = reset_peak()
    for _ in range(args.steps):
        step()
    print(json.dumps({"peak_mb": peak_mb_since(rss0), "steps": args.steps}))


if __name__ == "__main__":
    main()
