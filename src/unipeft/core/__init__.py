"""The method-independent abstraction: configs, targets, sites, the adapted model, registry, state."""
from .bank import Bank
from .config import AdapterConfig
from .delta import Delta
from .errors import AdapterLoadError, ConfigError, MergeError, TargetError, UnipeftError
from .model import AdaptedModel, adapt
from .registry import Capabilities, capability_table, get_method, public_methods, register
from .report import trainable_report
from .site import AdaptedSite

__all__ = ["AdaptedModel", "AdaptedSite", "AdapterConfig", "Bank", "AdapterLoadError", "Capabilities", "ConfigError",
           "Delta", "MergeError", "TargetError", "UnipeftError", "adapt", "capability_table", "get_method",
           "public_methods", "register", "trainable_report"]
