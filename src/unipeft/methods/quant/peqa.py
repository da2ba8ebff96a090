"""PEQA (Kim et al. 2023): fine-tune only the quantization scales of a quantized base.

On a bitsandbytes 4-bit / 8-bit linear the weight is W = diag(s) · codes, with s the stored
per-row (int8 SCB) or per-block (4-bit absmax) scales. PEQA learns a per-output-channel
multiplier g of those scales (init 1): W' = diag(g) · dequant(W_q), so y = g ⊙ (W_q x) + bias.
Merging multiplies the stored scales by g (`layers.scale_packed_rows`): the packed codes stay
bit-identical and the merge is exact up to one float32 rounding of each scale. With
double-quantized 4-bit absmax (or the eval-mode CPU repacked layout) the scales are not stored
in float32, so the merge goes through the requantizing write; `peqa_merge_errors` reports what
each merge stored against the exact diag(g) · W. On float layers (nn.Linear, GPT-2's Conv1D)
g scales the weight rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import TargetError
from ...core.fields import choice
from ...core.registry import Capabilities, register


@dataclass
class PeqaConfig(AdapterConfig):
    """PEQA: a learnable multiplier g (init 1) of each output channel's quantization scale."""

    peft_type = "PEQA"

    granularity: str = choice("channel", ("channel",))  # one multiplier per output channel (row)


class PeqaDelta(Delta):
    """`peqa_scale` (out,): out = base_out + (g - 1) ⊙ (base_out - bias), i.e. W' = diag(g) W."""

    weight_dependent = True  # the merged delta is (g - 1) W: core caches it to unmerge exactly
    commutes = True  # two multipliers of the same rows multiply in either order

    def __init__(self, base: nn.Module, config: PeqaConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        if not geo.is_matrix:
            raise TargetError(f"PEQA supports matrix layers only, '{path}' is a {type(base).__name__}")
        self.peqa_scale = nn.Parameter(torch.ones(geo.out_features))
        # max |stored - diag(g) W| of the most recent merge into a packed weight (None: none yet)
        self.last_merge_error: float | None = None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        h = base_out if bias is None else base_out - bias.to(base_out.dtype)
        # (g - 1) is exactly 0 at init, so the output is exactly the base output.
        return base_out + ((self.peqa_scale - 1) * h).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        w = layers.dense_weight(self.base)
        g = (self.peqa_scale - 1).to(w.dtype)
        return {"weight": layers.to_param_layout(self.base, w * g[:, None])}

    def merged_write(self, name: str, value: torch.Tensor) -> bool:
        """Packed weights: multiply the stored scales by g (exact) or, where they are not float32,
        requantize `value`; either way record the error against diag(g) W."""
        if name != "weight" or not layers.is_packed(self.base, name):
            return False
        with torch.no_grad():
            g = self.peqa_scale.detach().to(torch.float32)
            exact = layers.dense_weight(self.base) * g[:, None]
            if not layers.scale_packed_rows(self.base, g):
                layers.write_param(self.base, name, value)
            self.last_merge_error = float((layers.dense_weight(self.base) - exact).abs().max())
        return True


def peqa_merge_errors(model, adapter_name: str = "default") -> dict[str, float]:
    """{site path: max |stored - diag(g) W|} of the latest merge of PEQA adapter `adapter_name`
    into each packed (quantized) weight (about 1e-8 relative when the scales were rescaled in
    float32; the requantization error otherwise)."""
    out = {}
    for site in model.sites():
        delta = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if isinstance(delta, PeqaDelta) and delta.last_merge_error is not None:
            out[site.path] = delta.last_merge_error
    return out


register("peqa", PeqaConfig, PeqaDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=layers.MATRIX_LAYERS, quantized_base=True),
         exports=(peqa_merge_errors,))
