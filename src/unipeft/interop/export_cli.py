"""`unipeft export` verb (see interop/cli.py)."""
from .cli import add_export_arguments as add_arguments
from .cli import run_export as run

__all__ = ["add_arguments", "run"]
