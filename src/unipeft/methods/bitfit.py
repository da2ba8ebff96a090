"""BitFit: train only bias terms, as a zero-initialised additive delta on each existing bias."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.registry import Capabilities, register


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit; with target_modules=None every Linear/Conv/LayerNorm that has a bias is tuned."""

    peft_type = "BITFIT"


class BitFitDelta(Delta):
    """bias' = bias + bitfit_bias, applied in place (weight-side)."""

    kind = "weight"
    commutes = True

    def __init__(self, base: nn.Module, config: BitFitConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        bias = getattr(base, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise TargetError(f"BitFit: module '{path}' ({type(base).__name__}) has no bias to tune")
        self.bitfit_bias = nn.Parameter(torch.zeros_like(bias, dtype=torch.float32))

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bias = params["bias"]
        return {"bias": bias + self.bitfit_bias.to(bias.dtype)}

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"bias": self.bitfit_bias}


_LAYERS = layers.MATRIX_LAYERS + (nn.Conv1d, nn.Conv2d, nn.LayerNorm)


def _has_bias(path: str, module: nn.Module) -> bool:
    return isinstance(module, _LAYERS) and isinstance(getattr(module, "bias", None), torch.Tensor)


register("bitfit", BitFitConfig, BitFitDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=_LAYERS, quantized_base=True),
         default_targets=_has_bias)
