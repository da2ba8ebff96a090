"""Shrinking trained deltas: ComPEFT (top-k sparsified, ternary, bit-packed adapters; compeft.py) and
LoRA extraction from a full fine-tune (extract.py)."""
from .compeft import compress_adapter, decompress_adapter, load_compressed
from .extract import extract_lora

__all__ = ["compress_adapter", "decompress_adapter", "extract_lora", "load_compressed"]
