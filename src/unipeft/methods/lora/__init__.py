"""The LoRA family: config, layer deltas, variants (strategies) and inits (registered functions)."""
from ...core.registry import Capabilities, register
from .config import LoraConfig
from .deltas import LAYERS, LoraConv, LoraDelta, LoraEmbedding, LoraLinear
from .inits import INITS, InitContext, InitResult, register_init
from .variants import VARIANTS, Variant, register_variant

register("lora", LoraConfig, LoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     quantized_base=True, peft_compatible=True))

__all__ = ["INITS", "InitContext", "InitResult", "LoraConfig", "LoraConv", "LoraDelta", "LoraEmbedding",
           "LoraLinear", "VARIANTS", "Variant", "register_init", "register_variant"]
