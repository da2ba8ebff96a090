"""unipeft: parameter-efficient adaptation of frozen pretrained models behind one abstraction.

The method names exported here (each method's config class and its declared helpers, such as
`fuse` or `spt_adapt`) come from the registry: registering a method is all it takes to appear.
"""
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .core import (AdaptedModel, AdapterConfig, AdapterLoadError, Bank, Capabilities, ConfigError, Delta, MergeError,
                   TargetError, UnipeftError, adapt, capability_table, get_method, public_methods, register,
                   trainable_report)
from .core.calibration import BASE_HOLDS_RESIDUAL, calibration_data
from .core.compose import Average, BatchSplit, Block, Parallel, Split, Stack
from .core.hooks import TrainContext, TrainerCallback, TrainingHooks
from .core.registry import public_names as _public_names
from .kg import calibrator as _calibrator  # noqa: F401  (registers CQD^A, whose base layer is kg's)
from .merge import atlas_merge, merge_adapters

__version__ = "0.1.0"

__all__ = ["BASE_HOLDS_RESIDUAL", "calibration_data", "Average", "BatchSplit", "Block", "Parallel", "Split", "Stack",
           "AdaptedModel", "AdapterConfig", "AdapterLoadError", "Bank", "Capabilities", "ConfigError", "Delta",
           "MergeError", "TargetError", "TrainContext", "TrainerCallback", "TrainingHooks", "UnipeftError", "adapt", "capability_table", "get_method",
           "public_methods", "register", "trainable_report", "merge_adapters", "atlas_merge"]


def _export_methods() -> None:
    names = _public_names()
    globals().update(names)
    __all__.extend(sorted(set(names) - set(__all__)))


_export_methods()


def __getattr__(name: str):
    """Names of methods registered after import (e.g. by a plugin or a test) resolve on first use."""
    names = _public_names()
    if name in names:
        return names[name]
    raise AttributeError(f"module 'unipeft' has no attribute {name!r}")
