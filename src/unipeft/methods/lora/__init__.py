"""The LoRA family: config, layer deltas, variants (strategies), inits (registered functions) and
hot-swapping into compiled models (hotswap.py)."""
from ...core.registry import Capabilities, register
from .config import LoraConfig
from .deltas import LAYERS, LoraConv, LoraDelta, LoraEmbedding, LoraLinear
from .hotswap import hotswap_adapter, hotswap_adapter_from_state, prepare_hotswap
from .inits import INITS, InitContext, InitResult, known_inits, register_init
from .convert import save_as_plain_lora
from .loftq import replace_lora_weights_loftq
from .variants import VARIANTS, Variant, register_variant
from . import svd_inits, svd_variants  # noqa: F401  (register the SVD-family inits and variants)
from . import data_inits  # noqa: F401  (register the data-aware inits: corda, eva, lora_ga)

register("lora", LoraConfig, LoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     quantized_base=True, peft_compatible=True),
         exports=(prepare_hotswap, hotswap_adapter, hotswap_adapter_from_state, replace_lora_weights_loftq,
                  save_as_plain_lora),
         strategies=lambda: {"init": known_inits(), "variant": sorted(VARIANTS)})

__all__ = ["INITS", "InitContext", "InitResult", "LoraConfig", "LoraConv", "LoraDelta", "LoraEmbedding",
           "LoraLinear", "VARIANTS", "Variant", "hotswap_adapter", "hotswap_adapter_from_state", "prepare_hotswap",
           "register_init", "replace_lora_weights_loftq", "register_variant", "save_as_plain_lora"]
