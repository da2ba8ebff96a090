"""`unipeft train CONFIG.yaml [--key value ...]`: train, evaluate on the test split, write the run folder."""
from __future__ import annotations

import argparse

FLAGS = {"--resume": "resume", "--overwrite": "overwrite", "--quiet": "quiet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the train verb; everything after CONFIG not listed here is a `--key value` override."""
    parser.add_argument("config", help="YAML run config (see examples/fortunes_lora.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in <output_dir>.partial from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides: --epochs 1 --method.r 4 --optimizer.lr 5e-4 ...")


def split_flags(args: argparse.Namespace) -> list[str]:
    """Pull --resume/--overwrite/--quiet out of the overrides (they may follow CONFIG)."""
    from ..cli_args import pull_flags
    return pull_flags(args, tuple(FLAGS))


def run(args: argparse.Namespace) -> int:
    """Load the config, train, and print the test metrics."""
    from .config import load_config
    from .run import train_run

    cfg = load_config(args.config, split_flags(args))
    summary = train_run(cfg, resume=args.resume, overwrite=args.overwrite, show_progress=not args.quiet)
    from accelerate import PartialState
    if PartialState().is_main_process:
        test = summary["test"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "examples")
        print(f"test {shown} ({test.get('examples', 0)} examples)")
        print(f"wrote {cfg.output_dir} ({cfg.strategy.saved_as}, metrics.jsonl, summary.json) in "
              f"{summary['wall_seconds_this_process']:.0f} s")
    return 0
