"""The error raised for bad continual-learning input (unknown method, benchmark, scenario ...)."""
from __future__ import annotations

from ..core.errors import UnipeftError


class ContinualError(UnipeftError, ValueError):
    """Bad continual-learning input; the message names the field and the valid choices."""
