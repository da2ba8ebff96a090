"""Child process of benchmarks/memory.py: one `unipeft train` run with its memory measured, or the inference
reference of the same model.

    python -m benchmarks.memory_child train CONFIG.yaml [--key value ...]
    python -m benchmarks.memory_child inference CONFIG.yaml [--key value ...]

Prints one JSON line. The parent pins glibc's allocator (MALLOC_ENV) so freed memory returns to the kernel
the same way in every child. Process memory comes from /proc (VmHWM reset through clear_refs when training
begins, after the model, the data and the optimizer are built): `train_peak_mb` is what the steps (and the
validation passes between them, at the training batch size) add above that point. torch's own accounting
splits it: the bytes of the model's tensors (weights), of the gradients alive when the optimizer steps, of the
optimizer state after the first step, and of the distinct tensors autograd saves during the first step
(activations; a forward-only step saves none). `inference` loads the same model and runs
forward passes without autograd over training batches of the same size: its peak is the reference of the
zeroth-order claim.
"""
from __future__ import annotations

import json
import sys

import torch

from unipeft.core.hooks import TrainerCallback

from .memprobe import _status, peak_mb_since, reset_peak


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 2)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, however deeply nested (bitsandbytes keeps its 8-bit state
    in a dict per parameter, GaLore its moments per projected matrix); its state_dict covers wrapped and per-layer
    optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    found: list[torch.Tensor] = []

    def walk(v) -> None:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(inner.state_dict().get("state", {}))
    return tensor_bytes(found)


class Probe(TrainerCallback):
    """Resets the peak when training begins; during the first step records the distinct tensors autograd saves
    (activations) and the gradients alive when the optimizer steps; reads the optimizer state after it."""

    def __init__(self) -> None:
        self.rss0 = 0
        self.grads = self.state = 0
        self.peak_mb = 0.0
        self.saved: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            self.saved[s.data_ptr()] = s.nbytes()
        return t

    def on_train_begin(self, ctx) -> None:
        self.rss0 = reset_peak()

    def on_step_begin(self, ctx) -> None:
        if ctx.step == 0:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()

    def on_before_optimizer_step(self, ctx) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
        if ctx.step == 0:
            self.grads = tensor_bytes(p.grad for p in ctx.model.parameters() if p.grad is not None)

    def on_step_end(self, ctx) -> None:
        if ctx.step == 1:
            self.state = optimizer_state_bytes(ctx.optimizer)

    def on_train_end(self, ctx) -> None:
        self.peak_mb = peak_mb_since(self.rss0)


def train(config: str, overrides: list[str]) -> dict:
    """One training run with the probe; its summary, memory split and curves."""
    from unipeft.train.config import load_config
    from unipeft.train.run import train_run

    cfg = load_config(config, overrides)
    probe = Probe()
    summary = train_run(cfg, overwrite=True, show_progress=False, callbacks=[probe], log=lambda *_: None)
    from unipeft.train.artifacts import load_run

    run = load_run(cfg.output_dir)
    weights = tensor_bytes([*run.model.parameters(), *run.model.buffers()])
    with open(f"{cfg.output_dir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {"summary": {k: summary[k] for k in ("test", "valid", "steps", "train_seconds", "trainable_params")},
            "train_peak_mb": probe.peak_mb, "weights_mb": _mb(weights), "gradients_mb": _mb(probe.grads),
            "optimizer_state_mb": _mb(probe.state), "activations_mb": _mb(sum(probe.saved.values())),
            "optimizer": cfg.optimizer.name,
            "curve": [r for r in records if r.get("split") == "valid"],
            "loss_curve": [[r["step"], r["loss"]] for r in records if "split" not in r and "loss" in r]}


def inference(config: str, overrides: list[str], batches: int = 10) -> dict:
    """Peak above the loaded model of `batches` no-grad forwards at the training batch size."""
    from unipeft.data.encode import collate
    from unipeft.train.config import load_config
    from unipeft.train.evaluate import model_inputs
    from unipeft.train.setup import build_parts

    cfg = load_config(config, overrides)
    parts = build_parts(cfg)
    rows = parts.encode("train").rows
    model = parts.model.eval()
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    rss0 = reset_peak()
    with torch.no_grad():
        for i in range(batches):
            chunk = rows[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            model(**model_inputs(collate(chunk, parts.pad_id)))
    peak = peak_mb_since(rss0)
    return {"inference_peak_mb": peak, "weights_mb": _mb(weights), "resident_mb": round(_status("VmRSS") / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    """`train|inference CONFIG [--key value ...]`: print the JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    kind, config, overrides = argv[0], argv[1], argv[2:]
    torch.manual_seed(0)
    out = train(config, overrides) if kind == "train" else inference(config, overrides)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
