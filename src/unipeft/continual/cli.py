"""`unipeft continual`: run continual-learning methods on an offline benchmark and print the table."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Kept in step with learner.METHODS / suites.BENCHMARKS (a test checks it); listed here so that
# building the parser imports nothing heavy.
METHOD_NAMES = ("sgd", "er", "derpp", "joint", "sgd+fpf", "er+fpf", "derpp+fpf", "kfpf", "kfpf-kd")
BENCHMARK_NAMES = ("seq-digits", "seq-fortunes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `continual` verb."""
    parser.add_argument("--benchmark", default="seq-digits",
                        help=f"task stream to learn: {', '.join(BENCHMARK_NAMES)} (default: seq-digits)")
    parser.add_argument("--method", action="append", default=None,
                        help=f"method(s), repeatable or comma-separated: {', '.join(METHOD_NAMES)} (default: er+fpf)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default: 0)")
    parser.add_argument("--scenario", default="class-il", help="class-il (default) or task-il")
    parser.add_argument("--buffer-size", type=int, help="replay buffer capacity (default: the benchmark preset)")
    parser.add_argument("--epochs", type=int, help="epochs per task (default: the benchmark preset)")
    parser.add_argument("--fpf-steps", type=int, help="optimizer steps of the final FPF")
    parser.add_argument("--fpf-budget", type=float, help="fraction of the parameters FPF may fine-tune")
    parser.add_argument("--fpf-mode", help="plain models: 'full' (unfreeze the modules) or 'lora' (LoRA on them)")
    parser.add_argument("--k", type=int, dest="kfpf_k", help="number of FPF phases of k-FPF")
    parser.add_argument("--report", action="store_true", help="print the per-module forgetting ranking of FPF")
    parser.add_argument("--json", type=Path, help="also write the full results (per seed, mean, std) to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small models run slower with more)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and methods, then exit")


def _methods(values: list[str] | None) -> list[str]:
    names = [m.strip() for v in (values or ["er+fpf"]) for m in v.split(",") if m.strip()]
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    """Run the chosen methods and print the results table (and, with --report, FPF's module ranking)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import suites
    from .learner import METHODS, parse_method
    from .stream import SCENARIOS

    if args.list:
        for name, make in suites.BENCHMARKS.items():
            print(f"benchmark {name:<14} {make().description}")
        for name, text in METHODS.items():
            print(f"method    {name:<14} {text}")
        return 0
    if args.threads < 1:
        raise suites.ContinualError(f"--threads: expected a positive number, got {args.threads}")
    import torch
    torch.set_num_threads(args.threads)
    bench = suites.get_benchmark(args.benchmark)
    methods = _methods(args.method)
    for m in methods:
        parse_method(m)
    if args.scenario not in SCENARIOS:
        raise suites.ContinualError(f"unknown scenario {args.scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
    cfg = bench.preset()
    for field in ("buffer_size", "epochs", "kfpf_k"):
        if getattr(args, field) is not None:
            setattr(cfg, field, getattr(args, field))
    for arg, field in (("fpf_steps", "steps"), ("fpf_budget", "budget"), ("fpf_mode", "mode")):
        if getattr(args, arg) is not None:
            setattr(cfg.fpf, field, getattr(args, arg))
    # With several methods, a warm-up epoch keeps start-up costs out of the first one's wall time.
    payload = suites.run_benchmark(bench.name, methods, args.seeds, args.scenario, cfg,
                                   progress=not args.no_progress, warmup=len(methods) > 1)
    print()
    print(suites.markdown_table(payload))
    if "er" not in payload["per_seed"] and not any(m.endswith("+fpf") and m.startswith("er") for m in methods):
        print("(compute ratios need an ER run: add --method er)")
    if args.report:
        for m, table in payload["drift_report"].items():
            print(f"\nforgetting-prone modules ({m}, seed {args.seeds[-1]}):\n{table}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
