"""Errors raised for bad user input; each message names the field/module and what was expected."""


class UnipeftError(Exception):
    """Base class for every error caused by user input (the CLI maps these to exit code 2)."""


class ConfigError(UnipeftError, ValueError):
    """A config field has a bad value, or a config file cannot be read."""


class TargetError(UnipeftError, ValueError):
    """A config selects no module, or a module of a type the method does not support."""


class AdapterLoadError(UnipeftError, ValueError):
    """A saved adapter does not fit the model (missing/unexpected keys, shape mismatch)."""


class MergeError(UnipeftError, RuntimeError):
    """A merge was refused: the method is not mergeable, or the result is not finite."""
