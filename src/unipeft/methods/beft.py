"""BEFT: train only a bias vector added to the output of chosen linear layers (by default the attention
value projections), out = base(x) + beft_bias.

The vector `beft_bias` has PEFT's shape (1, out) and starts at zero (the identity); init_weights=False
leaves PEFT's standard-normal draw. Its weight-space form is a change of the layer's own bias, so core
merges it into layers that have a bias; merging into a layer without one is refused with a MergeError
naming the layer (as PEFT refuses it), and the model is left unchanged. Several active adapters add
their vectors, in either order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import MergeError
from ..core.registry import Capabilities, register

# PEFT's default targets: the value projection's name in each architecture it knows.
VALUE_PROJECTIONS = ("value", "v_proj", "v", "value_proj")


@dataclass
class BeftConfig(AdapterConfig):
    """BEFT (PEFT's BeftConfig): a trained output bias on each target Linear; with target_modules=None the
    attention value projections (value, v_proj, v, value_proj) are tuned."""

    peft_class = "BeftConfig"
    peft_type = "BEFT"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")

    init_weights: bool = True


class BeftDelta(Delta):
    """The vector `beft_bias` (1, out), added to the layer's output."""

    commutes = True  # additive

    def __init__(self, base: nn.Module, config: BeftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        out_features = layers.geometry(base).out_features
        # Drawn then zeroed, as PEFT does, so a seeded run consumes the same random numbers.
        vector = torch.randn((1, out_features))
        if config.init_weights:
            vector.zero_()
        self.beft_bias = nn.Parameter(vector)
        self.identity_at_init = bool(config.init_weights)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (base_out + self.beft_bias.flatten().to(base_out.dtype)).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        if self.base.bias is None:
            raise MergeError(f"BEFT at '{self.path}': the layer has no bias to merge the trained vector into; "
                             f"keep the adapter unmerged for this layer")
        return {"bias": self.beft_bias.flatten()}


def _value_projection(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in VALUE_PROJECTIONS


register("beft", BeftConfig, BeftDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True),
         default_targets=_value_projection)
