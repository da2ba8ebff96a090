"""Run a benchmark suite: `python -m benchmarks.run --suite quick|full [--out DIR] [--threads N]`.

Writes benchmarks/results/peft_<suite>.json (rows with per-repeat samples, ratios with bands, profiles,
findings, targets with verdicts, versions, machine), a markdown report and a PNG of the targets.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Per model: training batch x seq, inference batch sizes and seq, mixed batch (rows, adapters, seq).
MINILM = dict(train=(8, 128), inf_sizes=(1, 16), inf_seq=128, mixed=(64, 64, 128))  # the main measurement config
SUITES = {
    "quick": dict(models=("tiny-gpt2", "minilm"), main="minilm", repeat=7, inf_repeat=15, memory=True,
                  n_inject=50, profile_steps=3, compile="inductor",
                  shapes={"minilm": MINILM,
                          "tiny-gpt2": dict(train=(8, 32), inf_sizes=(1, 16), inf_seq=32, mixed=(32, 8, 32))}),
    "full": dict(models=("tiny-gpt2", "minilm"), main="minilm", repeat=15, inf_repeat=40, memory=True,
                 n_inject=50, profile_steps=5, compile="inductor",
                 shapes={"minilm": MINILM,
                         "tiny-gpt2": dict(train=(16, 64), inf_sizes=(1, 16), inf_seq=64, mixed=(32, 8, 64))}),
    "test": dict(models=("micro-gpt2",), main="micro-gpt2", repeat=3, inf_repeat=3, memory=False, n_inject=6,
                 profile_steps=1, compile="eager",
                 shapes={"micro-gpt2": dict(train=(2, 8), inf_sizes=(1,), inf_seq=8, mixed=(8, 8, 8))}),
}


def choose_threads(threads: int | None) -> dict:
    """`threads` if given, else the physical cores available (unipeft's default_threads on an idle machine).

    unipeft's training default drops to fewer threads while other work keeps the machine busy; a
    benchmark keeps the same configuration instead and records the load (and that warning) next to it."""
    from unipeft.train.threads import default_threads

    busy = default_threads().warning
    load = round(os.getloadavg()[0], 2)
    if threads is not None:
        return {"threads": threads, "reason": "set by --threads", "load_1min": load, "busy_warning": busy}
    c = default_threads(load=0.0)
    return {"threads": c.threads, "reason": c.reason, "load_1min": load, "busy_warning": busy}


def measure_model(model: str, cfg: dict, log) -> tuple[list[dict], dict]:
    """Every row of one model (timings first, then the profiler pass, so profiling never slows a timing)."""
    from . import peft_suite as s
    from .compile_rows import compile_rows
    from .profile import profile_inference, profile_training

    sh = cfg["shapes"][model]
    (size, seq), n = sh["train"], cfg["n_inject"]
    marks = (2, 10, n) if n >= 50 else (2, n)
    log(f"{model}: training rows ({size} x {seq})")
    rows = s.training_rows(model, size, seq, cfg["repeat"], cfg["memory"])
    log(f"{model}: inference rows")
    rows += s.inference_rows(model, sh["inf_sizes"], sh["inf_seq"], cfg["inf_repeat"])
    log(f"{model}: mixed-batch, inject/load, merge rows")
    rows += s.mixed_batch_rows(model, sh["mixed"][0], sh["mixed"][2], sh["mixed"][1], cfg["repeat"])
    rows += s.inject_load_rows(model, n, marks)
    rows += s.merge_rows(model, sh["inf_seq"])
    if model == cfg["main"] and cfg["compile"]:
        log(f"{model}: torch.compile rows ({cfg['compile']})")
        rows += compile_rows(model, size, seq, cfg["repeat"], cfg["compile"])
    log(f"{model}: profiling")
    profiles = {"train_step": profile_training(model, size, seq, s.METHODS, cfg["profile_steps"]),
                "inference_batch1": profile_inference(model, sh["inf_seq"], max(2, cfg["profile_steps"]))}
    return rows, profiles


def run(suite: str, out_dir: Path | None = None, threads: int | None = None, tta: Path | None = None) -> Path:
    """Run every row of `suite` with `threads` torch threads and write its JSON, markdown report and PNG."""
    th = choose_threads(threads)
    # Children (memory probes) inherit the thread count through the environment.
    os.environ["OMP_NUM_THREADS"] = os.environ["UNIPEFT_BENCH_THREADS"] = str(th["threads"])
    import torch

    torch.set_num_threads(th["threads"])
    from .common import RESULTS, versions, write_results
    from .plots import png_path
    from .profile import findings
    from .table import markdown
    from .targets import judge, load_tta, plot

    out_dir = out_dir or RESULTS
    cfg = SUITES[suite]
    rows: list[dict] = []
    profiles: dict = {}
    notes: list[str] = []
    t0, load0 = time.time(), os.getloadavg()
    for model in cfg["models"]:
        got, profiles[model] = measure_model(model, cfg, lambda msg: print(f"[{suite}] {msg}", flush=True))
        rows += got
        bound = next((r["seconds"]["bound"] for r in got if r["row"] == "train_step"), None)
        notes += findings(model, profiles[model], bound)
    entries, missing = judge(rows, cfg["main"], load_tta(tta or out_dir / "time_to_accuracy.json"))
    payload = {"suite": suite, "config": cfg, "versions": versions(), "threads": th, "rows": rows,
               "profiles": profiles, "findings": notes, "targets": entries, "targets_not_measured": missing,
               "wall_seconds": round(time.time() - t0, 1),
               "load_average_at_start_and_end": [load0, os.getloadavg()]}
    path = write_results(f"peft_{suite}", payload, markdown(payload), out_dir)
    plot(entries, [r for r in rows if r["row"] == "compile"], png_path(path),
         f"unipeft targets ({suite} suite, {cfg['main']}, {th['threads']} torch thread(s))")
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every measurement (default: unipeft's default, the physical cores)")
    parser.add_argument("--tta", type=Path, default=None, help="time_to_accuracy.json to judge (default: the one "
                                                               "in the results folder, if present)")
    args = parser.parse_args(argv)
    print(f"wrote {run(args.suite, args.out, args.threads, args.tta)}")


if __name__ == "__main__":
    main()
