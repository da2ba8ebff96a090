"""`unipeft extract-lora` verb (see compress/cli.py)."""
from .cli import add_extract_arguments as add_arguments
from .cli import run_extract as run

__all__ = ["add_arguments", "run"]
