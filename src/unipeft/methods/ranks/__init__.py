"""Rank allocation during training, driven by training callbacks (core/hooks.py):

AdaLoRA (prunes SVD-form ranks to a budget; PEFT's format), IncreLoRA (grows them), SoRA (gates
sparsified by a proximal L1 step; exports a plain smaller LoRA) and TriAdaptLoRA (triangular
rank matrices grown past a threshold). Rank changes resize parameters and optimizer state in
place (core/resize.py) and are recorded in the adapter's config (`rank_pattern`).
"""
from ...core.registry import Capabilities, register
from .adalora import AdaLoraConfig, RankAllocator
from .increlora import IncreLoraConfig, IncreLoraDelta, RankGrower
from .sora import GateProximal, SoraConfig, SoraDelta, export_sora_lora
from .svd import LAYERS, SvdDelta
from .triadapt import ThresholdGrowth, TriAdaptDelta, TriAdaptLoraConfig


class AdaLoraDelta(SvdDelta):
    """AdaLoRA's delta (svd.py)."""


def _caps(peft: bool = False) -> Capabilities:
    return Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS, peft_compatible=peft)


register("adalora", AdaLoraConfig, AdaLoraDelta, _caps(peft=True))
register("increlora", IncreLoraConfig, IncreLoraDelta, _caps())
register("sora", SoraConfig, SoraDelta, _caps(), exports=(export_sora_lora,))
register("triadaptlora", TriAdaptLoraConfig, TriAdaptDelta, _caps())

__all__ = ["AdaLoraConfig", "AdaLoraDelta", "GateProximal", "IncreLoraConfig", "IncreLoraDelta", "RankAllocator",
           "RankGrower", "SoraConfig", "SoraDelta", "SvdDelta", "ThresholdGrowth", "TriAdaptDelta",
           "TriAdaptLoraConfig", "export_sora_lora"]
