"""Quantization-aware methods: PEQA (train the scales of a quantized base), L4Q (quantization-aware
LoRA whose merge is an exactly quantized weight) and 1-bit LoRA (sign-quantized factors, bit-packed
on disk). Each module registers its method on import."""
from .l4q import L4QConfig, L4QDelta, l4q_merge_and_unload, l4q_quantized_state
from .onebit import OneBitLoraConfig, OneBitLoraDelta, adapter_storage_bytes
from .peqa import PeqaConfig, PeqaDelta, peqa_merge_errors

__all__ = ["L4QConfig", "L4QDelta", "OneBitLoraConfig", "OneBitLoraDelta", "PeqaConfig", "PeqaDelta",
           "adapter_storage_bytes", "l4q_merge_and_unload", "l4q_quantized_state", "peqa_merge_errors"]
