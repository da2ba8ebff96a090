"""Structured low-rank methods as PEFT has them: GraLoRA (block-granular LoRA), DeFT (residual-projection
update of the base weight), Lily (low-rank adapters shared across layers with a router over shared up
projections) and PEANuT (a small network of the base weight as the update). PEFT's on-disk layout."""
from .deft import DeftConfig, DeftDelta
from .gralora import GraloraConfig, GraloraDelta
from .lily import LilyConfig, LilyDelta
from .peanut import PeanutConfig, PeanutDelta

__all__ = ["DeftConfig", "DeftDelta", "GraloraConfig", "GraloraDelta", "LilyConfig", "LilyDelta",
           "PeanutConfig", "PeanutDelta"]
