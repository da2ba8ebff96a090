"""unipeft: parameter-efficient adaptation of frozen pretrained models behind one abstraction."""
from .core import (AdaptedModel, AdapterConfig, AdapterLoadError, Capabilities, ConfigError, Delta, MergeError,
                   TargetError, UnipeftError, adapt, capability_table, get_method, public_methods, register,
                   trainable_report)
from .methods import BitFitConfig, IA3Config, LNTuningConfig, LoraConfig
from .methods import CQDCalibratorConfig
from .methods import (BottleneckConfig, DeptConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig, SSFConfig,
                      FusionConfig, PolyConfig, add_mam, fuse)
from .methods import (DiffPruningConfig, HftConfig, LisaConfig, S2ftConfig, SaraConfig, SpielConfig, SptConfig,
                      TrainingHooks, spt_adapt)

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "AdapterConfig", "AdapterLoadError", "BitFitConfig", "Capabilities", "ConfigError",
           "Delta", "IA3Config", "LNTuningConfig", "LoraConfig", "MergeError", "TargetError", "UnipeftError",
           "adapt", "capability_table", "get_method", "public_methods", "register", "trainable_report"]
__all__ += ["DiffPruningConfig", "HftConfig", "LisaConfig", "S2ftConfig", "SaraConfig", "SpielConfig", "SptConfig",
            "TrainingHooks", "spt_adapt"]
__all__ += ["BottleneckConfig", "DeptConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
            "SSFConfig", "add_mam", "FusionConfig", "PolyConfig", "fuse"]
__all__ += ["CQDCalibratorConfig"]
