"""`unipeft search CONFIG.yaml`: multi-objective configuration search on Optuna (see search/config.py)."""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Search the `search.space` of CONFIG.yaml (method families, ranks, layers, lr, ...) for the trade-off of "
        "the `search.objectives` (e.g. valid_accuracy vs trainable_params) with an Optuna sampler, pruning "
        "hopeless trials on their validation scores. The study lives in a database: rerunning the command "
        "resumes it, and --workers K processes share it. Writes the Pareto front (pareto.md, pareto.png, "
        "pareto.json) and a runnable run config per front member (front/trial-NNNN.yaml) to search.output_dir.")
    parser.add_argument("config", help="run config with a `search:` section")
    parser.add_argument("--trials", type=int, help="trial budget of the study (default: search.trials)")
    parser.add_argument("--storage", help="Optuna RDB URL (default: sqlite:///<search.output_dir>/study.db)")
    parser.add_argument("--study", help="study name (default: the config file's stem)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the study (default 1)")
    parser.add_argument("--show", action="store_true", help="only report an existing study; run no trial")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child of --workers
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value: run-config keys, or --search.X for the search section")


def run(args: argparse.Namespace) -> int:
    from .config import load_search
    from .report import markdown, write_report
    from .runner import open_study, run_search, work

    from ..cli_args import pull_flags
    rest = pull_flags(args, ("--show", "--worker", "--quiet"), {"--trials": int, "--storage": str, "--study": str,
                                                               "--workers": int})
    overrides = [*rest, *(["--search.trials", str(args.trials)] if args.trials else [])]
    plan = load_search(args.config, overrides)
    if args.show:
        study = open_study(plan, args.storage, args.study, create=False)
    elif args.worker:
        study = open_study(plan, args.storage, args.study)
        threads = os.environ.get("UNIPEFT_SEARCH_THREADS")
        work(plan, study, int(threads) if threads else None)
        return 0
    else:
        study = run_search(plan, args.config, args.storage, args.study, args.workers, overrides, not args.quiet)
    payload = write_report(study, plan.search.output_dir)
    print(markdown(payload))
    print(f"wrote {plan.search.output_dir}/pareto.md, pareto.png, pareto.json, front/")
    return 0
