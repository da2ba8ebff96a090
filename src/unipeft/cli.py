"""`unipeft <verb>`: a thin command line; each verb lives in the module that implements it."""
from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
# Modules are imported only when their verb runs, so `unipeft --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("unipeft.demo", "adapt the offline MiniLM model with LoRA and check merge equivalence"),
    "import": ("unipeft.interop.import_cli", "check an adapter folder of another library (--from peft) and write it"),
    "export": ("unipeft.interop.export_cli", "check a unipeft adapter and write it for another library (--to peft)"),
}


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per verb."""
    parser = argparse.ArgumentParser(
        prog="unipeft",
        description="Parameter-efficient adaptation of frozen pretrained models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the verb, map user errors to exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"unipeft {args.verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
