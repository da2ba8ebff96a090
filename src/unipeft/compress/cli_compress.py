"""`unipeft compress` verb (see compress/cli.py)."""
from .cli import add_compress_arguments as add_arguments
from .cli import run_compress as run

__all__ = ["add_arguments", "run"]
