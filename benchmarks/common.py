"""Shared benchmark plumbing: medians after warm-up, peak memory in a child process, JSON + markdown."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 2, inner: int = 1) -> float:
    """Median wall time of `inner` calls of fn over `repeat` runs, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def interleaved_samples(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2,
                        inner: int = 1) -> dict[str, list[float]]:
    """Per-round times of several functions measured in alternation (round i times each once, mean of
    `inner` calls); the order rotates every round so no function always runs right after the same one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeat):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = fns[key]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[key].append((time.perf_counter() - t0) / inner)
    return samples


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2, inner: int = 1) -> dict:
    """Median times of several functions measured in alternation, so drift hits all of them alike."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, repeat, warmup, inner).items()}


def peak_rss_mb(module: str, args: list[str]) -> dict:
    """Run `python -m module args` in a fresh process; it prints one JSON line with its measurements."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                         check=False, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict:
    """Versions of the libraries and the machine the figures come from."""
    import peft
    import torch
    import transformers

    import unipeft

    return {"unipeft": unipeft.__version__, "peft": peft.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_results(name: str, payload: dict, table: str, out_dir: Path = RESULTS) -> Path:
    """Write <name>.json and <name>.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (out_dir / f"{name}.md").write_text(table + "\n")
    return path


def write_outputs(out: Path, res: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None],
                  indent: int = 2) -> Path:
    """A reproduction's results: `out` (JSON), the markdown table beside it (.md, also printed) and the PNG."""
    from .plots import png_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=indent) + "\n")
    table = markdown(res)
    out.with_suffix(".md").write_text(table)
    plot(res, png_path(out))
    print(table)
    return out

