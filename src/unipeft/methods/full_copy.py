"""Trainable full copies of whole modules: `modules_to_save` (e.g. a new head) and LayerNorm tuning."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.registry import Capabilities, register


class _NormMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, nn.Module) and type(obj).__name__.endswith("Norm")


class NormLayer(metaclass=_NormMeta):
    """Matches any normalisation layer: a module whose class name ends in 'Norm'."""


class FullCopyDelta(Delta):
    """The module runs with the parameters of a trainable copy (weight-side, exact round trip)."""

    kind = "weight"
    weight_dependent = True
    attr = "copy"

    def __init__(self, base: nn.Module, config: AdapterConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        clone = copy.deepcopy(base)
        for p in clone.parameters():
            p.requires_grad_(True)
        setattr(self, self.attr, clone)

    def _copy(self) -> nn.Module:
        return getattr(self, self.attr)

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self._copy().named_parameters())

    def delta_weight(self) -> dict[str, torch.Tensor]:
        base = dict(self.base.named_parameters())
        return {n: p - base[n] for n, p in self._copy().named_parameters()}


@dataclass
class ModulesToSaveConfig(AdapterConfig):
    """Internal: the config type behind `modules_to_save` (never saved on its own)."""

    peft_type = "MODULES_TO_SAVE"


class ModulesToSaveDelta(FullCopyDelta):
    """PEFT saves these as `<path>.<param>` (the full tensors, no infix)."""

    attr = "modules_to_save"

    def saved_key(self, key: str) -> str:
        return key.removeprefix("modules_to_save.")


@dataclass
class LNTuningConfig(AdapterConfig):
    """LayerNorm tuning: train copies of the normalisation layers (default: every *Norm module)."""

    peft_class = "LNTuningConfig"
    peft_type = "LN_TUNING"
    not_in_peft = ("layers_to_transform", "layers_pattern")


class LNTuningDelta(FullCopyDelta):
    """Stored as PEFT's LN_TUNING does: `<path>.ln_tuning_layers.<param>`."""

    attr = "ln_tuning_layers"


register("modules_to_save", ModulesToSaveConfig, ModulesToSaveDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Module,)), internal=True)
register("ln_tuning", LNTuningConfig, LNTuningDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(NormLayer,), peft_compatible=True, quantized_base=True),
         default_targets=lambda path, m: isinstance(m, NormLayer))
