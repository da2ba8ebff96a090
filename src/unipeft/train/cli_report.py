"""`unipeft report RUN_DIR`: draw a run's metrics.jsonl (loss, learning rate, validation metrics vs step) to a PNG."""
from __future__ import annotations

import argparse

EPILOG = ("One panel per quantity, against the optimizer step: the training loss (with the validation and "
          "test loss on the same axes), the learning rate, the gradient norm when max_grad_norm is set, and "
          "each validation metric (accuracy, macro-F1; perplexity, token accuracy for causal_lm) with the "
          "final test value as a star. Works on a finished run and on a run in progress (RUN_DIR.partial). "
          "Drawn with matplotlib's Agg backend: no display needed. A missing, empty or malformed "
          "metrics.jsonl is an error (exit code 2) and nothing is written.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the report verb."""
    parser.epilog = EPILOG
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl (output_dir of unipeft train)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="the PNG to write (default: RUN_DIR/report.png; its folder must exist)")


def run(args: argparse.Namespace) -> int:
    """Write the PNG and print its path."""
    from .plots import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0
