"""Built-in methods; importing this package registers them."""
from .bitfit import BitFitConfig
from .cqd_calibrator import CQDCalibratorConfig
from .full_copy import LNTuningConfig, ModulesToSaveConfig
from .ia3 import IA3Config
from .lora import LoraConfig
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
