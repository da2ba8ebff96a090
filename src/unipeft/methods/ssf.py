"""SSF (Lian et al., 2022): scale and shift the features a layer outputs, out = gamma * h + beta.

Mergeable: gamma and beta fold into the layer's weight and bias (W' = gamma W, b' = gamma b + beta),
so SSF targets layers that have a bias (Linear, GPT-2 Conv1D, LayerNorm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.registry import Capabilities, register


class _BiasedMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return (isinstance(obj, layers.MATRIX_LAYERS + (nn.LayerNorm,)) and getattr(obj, "bias", None) is not None
                and getattr(obj, "weight", None) is not None)


class LayerWithBias(metaclass=_BiasedMeta):
    """Matches a Linear, GPT-2 Conv1D or LayerNorm that has a weight and a bias (SSF merges into both)."""


@dataclass
class SSFConfig(AdapterConfig):
    """SSF: a trainable scale (init 1) and shift (init 0) per output feature of every target."""

    peft_type = "SSF"


class SSFDelta(Delta):
    """`ssf_scale` and `ssf_shift` over the last (feature) dimension of the output."""

    weight_dependent = True  # the merged delta is (gamma - 1) * W: cache it to unmerge exactly

    def __init__(self, base: nn.Module, config: SSFConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        features = base.bias.shape[0]
        self.ssf_scale = nn.Parameter(torch.ones(features))
        self.ssf_shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (base_out * self.ssf_scale + self.ssf_shift).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        b = self.base.bias
        g = self.ssf_scale - 1
        if isinstance(self.base, nn.LayerNorm):
            dw = self.base.weight * g
        else:  # scale the rows (output features) of the dense (out, in) weight
            dw = layers.to_param_layout(self.base, layers.dense_weight(self.base) * g[:, None])
        return {"weight": dw, "bias": b * g + self.ssf_shift}


register("ssf", SSFConfig, SSFDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(LayerWithBias,), quantized_base=True))
