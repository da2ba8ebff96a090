"""Built-in methods; importing this package registers them."""
from .bitfit import BitFitConfig
from .cqd_calibrator import CQDCalibratorConfig
from .full_copy import LNTuningConfig, ModulesToSaveConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .dept import DeptConfig
from .prefix import PrefixTuningConfig
from .prompts import PromptTuningConfig, PTuningConfig
from .adapters import BottleneckConfig, add_mam
from .ssf import SSFConfig
from .fusion import FusionConfig, fuse
from .routing import PolyConfig
from .sara import SaraConfig
from .selective import HftConfig, LisaConfig
from .sparse_diff import DiffPruningConfig
from .sparse_hooks import TrainingHooks
from .sparse_s2ft import S2ftConfig
from .sparse_spiel import SpielConfig
from .sparse_spt import SptConfig, spt_adapt

__all__ = ["BitFitConfig", "CQDCalibratorConfig", "IA3Config", "LNTuningConfig", "LoraConfig", "ModulesToSaveConfig"]
__all__ += ["DiffPruningConfig", "HftConfig", "LisaConfig", "S2ftConfig", "SaraConfig", "SpielConfig",
            "SptConfig", "TrainingHooks", "spt_adapt"]
__all__ += ["BottleneckConfig", "DeptConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
            "SSFConfig", "add_mam", "FusionConfig", "PolyConfig", "fuse"]
