"""`unipeft compare CONFIG.yaml --methods lora,ia3,full [--seeds 3] [--grid lr=1e-4,3e-4,1e-3]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .plan import DEFAULT_GRID, DEFAULT_METHODS

PACKAGES = ("unipeft", "torch", "transformers", "peft", "optuna")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train every method of --methods on CONFIG.yaml's data for every --grid value and seed, pick each "
        "method's grid value on the validation split (mean over seeds), and report its test score next to a "
        "no-training baseline (the untrained head, or zero-shot for a causal LM) and full fine-tuning when "
        "listed ('full'). Writes one JSON per run in PEFT's method-comparison layout (runs/), compare.md, "
        "compare.json and compare.png (quality vs trainable fraction, bubble = peak memory) to --output. "
        "Runs are trials of a grid study (the `unipeft search` runner): a rerun skips finished runs, "
        "--workers K share them. A method that does not apply to the model is skipped with its reason.")
    parser.add_argument("config", help="a run config (as for `unipeft train`); its method section sets the "
                                       "fields of that method's row")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated registered methods, 'full' for full fine-tuning (default {DEFAULT_METHODS})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per grid point (default 3)")
    parser.add_argument("--grid", action="append", default=None,
                        help=f"key=v1,v2,...: a run-config key searched per method on validation; repeatable; "
                             f"'lr' is optimizer.lr (default {DEFAULT_GRID})")
    parser.add_argument("--output", help="output folder (default runs/compare-<config stem>)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-training reference")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value: run-config keys (e.g. --max_steps 50)")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run(args: argparse.Namespace) -> int:
    from ..cli_args import pull_flags
    from ..search.runner import run_search
    from .baseline import baseline_run
    from .plan import check_output, load_compare, parse_grid, parse_methods, study_name
    from .report import markdown, run_rows, write_report

    args.storage = args.study = None
    rest = pull_flags(args, ("--no-baseline", "--quiet", "--compare-worker"),
                      {"--methods": str, "--seeds": int, "--grid": list, "--output": str, "--workers": int,
                       "--storage": str, "--study": str})
    plan = load_compare(args.config, parse_methods(args.methods), parse_grid(args.grid or [DEFAULT_GRID]),
                        args.seeds, args.output, rest)
    if getattr(args, "compare_worker", False):  # one more process of --workers K
        import os

        from ..search.runner import open_study, work
        threads = os.environ.get("UNIPEFT_SEARCH_THREADS")
        work(plan, open_study(plan, args.storage, args.study), int(threads) if threads else None)
        return 0
    check_output(plan)
    baselines = []
    if not args.no_baseline:
        baselines = [baseline_run(plan, s) for s in range(args.seeds)]
    # the workers rerun this command line, so they rebuild the same plan; --quiet children
    study = run_search(plan, args.config, None, study_name(plan), args.workers, None, not args.quiet,
                       worker_cmd=_worker_cmd(args, rest))
    metric = plan.search.objectives[0].removeprefix("valid_")  # the task's main metric (see load_compare)
    summary = write_report(run_rows(study, plan), baselines, metric, Path(plan.search.output_dir), versions())
    print(markdown(summary))
    print(f"wrote {plan.search.output_dir}/compare.md, compare.json, compare.png, runs/")
    return 0


def _worker_cmd(args: argparse.Namespace, rest: list[str]) -> list[str]:
    cmd = ["compare", args.config, "--methods", args.methods, "--seeds", str(args.seeds)]
    for g in args.grid or []:
        cmd += ["--grid", g]
    if args.output:
        cmd += ["--output", args.output]
    return cmd + ["--compare-worker", *rest]

