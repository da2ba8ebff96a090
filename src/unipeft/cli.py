"""`unipeft <verb>`: a thin command line; each verb lives in the module that implements it."""
from __future__ import annotations

import argparse
import importlib
import sys

from .core.errors import UnipeftError

# verb -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
# Modules are imported only when their verb runs, so `unipeft --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("unipeft.interop.import_cli", "check an adapter folder of another library (--from peft) and write it"),
    "export": ("unipeft.interop.export_cli", "check a unipeft adapter and write it for another library (--to peft)"),
    "continual": ("unipeft.continual.cli", "continual learning (SGD, ER, DER++, FPF, k-FPF) on offline benchmarks"),
    "train": ("unipeft.train.cli_train", "train a method from a YAML run config (accelerate: 1 or N processes)"),
    "eval": ("unipeft.train.cli_eval", "metrics of a finished run on a split or a data file"),
    "predict": ("unipeft.train.cli_predict", "label or generation for input texts with a finished run"),
    "generate": ("unipeft.train.cli_generate", "stream completions of prompts with a causal LM run or adapter folder"),
    "info": ("unipeft.train.cli_info", "trainable-parameter report of a config applied to its model, no training"),
    "report": ("unipeft.train.cli_report", "draw a run's metrics.jsonl (loss, learning rate, valid metrics) as a PNG"),
    "merge": ("unipeft.merge.cli", "merge adapters or full checkpoints from a mergekit-style YAML (TIES, DARE, SVD, ...)"),
    "compress": ("unipeft.compress.cli_compress", "ComPEFT: sparsify an adapter and store it as bit-packed ternary"),
    "extract-lora": ("unipeft.compress.cli_extract", "a LoRA adapter (PEFT format) from a full fine-tune, by SVD"),
    "serve": ("unipeft.serve.cli", "serve a base model and its adapters over an OpenAI-compatible HTTP API"),
    "federated": ("unipeft.federated.cli", "federated training of an adapter on Flower (FedAvg, FFA-LoRA, LoRA-FAIR, ...)"),
    "compare": ("unipeft.compare.cli", "which method for this task: every method, lr picked on validation, tested with references"),
    "search": ("unipeft.search.cli", "multi-objective configuration search on Optuna (Pareto front of accuracy vs size)"),
    "kg": ("unipeft.kg.cli", "complex query answering over knowledge graphs (CQD, CQD^A) on UMLS/Kinships/Nations"),
}


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `verb`'s module is imported to add its arguments (fast, and a verb
    whose optional dependencies are missing cannot break the others)."""
    parser = argparse.ArgumentParser(
        prog="unipeft",
        description="Parameter-efficient adaptation of frozen pretrained models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == verb:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the verb, map user errors to exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, UnipeftError, FileNotFoundError) as exc:
        # One line: a multi-line message (e.g. a per-module load report) is joined with "; ".
        msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"unipeft {args.verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
