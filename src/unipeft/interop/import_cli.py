"""`unipeft import` verb (see interop/cli.py)."""
from .cli import add_import_arguments as add_arguments
from .cli import run_import as run

__all__ = ["add_arguments", "run"]
