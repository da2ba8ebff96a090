"""Built-in methods; importing this package registers them."""
from .bitfit import BitFitConfig
from .full_copy import LNTuningConfig, ModulesToSaveConfig
from .ia3 import IA3Config
from .lora import LoraConfig

__all__ = ["BitFitConfig", "IA3Config", "LNTuningConfig", "LoraConfig", "ModulesToSaveConfig"]
