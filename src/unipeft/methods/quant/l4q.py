"""L4Q (Jeon et al. 2024): LoRA trained quantization-aware, so the merged weight is quantized.

The site runs with the weight Q(W + s B A), s = alpha / r, where Q is L4Q's uniform
asymmetric (LSQ+-style) quantizer over groups of `group_size` consecutive input features of each
output row: Q(v) = clamp(round((v - beta) / alpha), 0, 2^bits - 1) · alpha + beta, with a learnable
scale alpha and offset beta per group. round() passes gradients straight through (STE); clamp
does not pass them outside the range, so A, B, alpha and beta all get gradients. alpha and beta
start at the min-max fit of the base weight (alpha = (max - min) / (2^bits - 1), beta = min); a
row's last group is shorter when in_features is not a multiple of group_size.

At init B = 0, so the output is Q(W) x + bias (the quantized base), not the base output:
`identity_at_init = False`. Merging writes Q(W + s B A) itself (not W + delta), so the merged
weight equals the weight the forward used, bit for bit, with at most 2^bits values per group;
unmerging subtracts the cached delta (within float32 rounding of W). `l4q_merge_and_unload`
returns the plain model holding those quantized weights; `l4q_quantized_state` gives them as
integer codes, scales and offsets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import Rule, positive_int, positive_number, ruled
from ...core.registry import Capabilities, register
from ._ste import RoundSTE


@dataclass
class L4QConfig(AdapterConfig):
    """L4Q: out = Q(W + (alpha / r) B A) x + bias, Q a learnable group-wise uniform quantizer."""

    peft_type = "L4Q"
    peft_names = {"alpha": "lora_alpha"}

    r: int = positive_int(8)
    alpha: float = positive_number(16)  # scaling alpha / r (saved as lora_alpha, as LoRA)
    bits: int = ruled(4, Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8,
                              "an integer number of bits in 2..8"))
    group_size: int = positive_int(64)  # consecutive input features sharing one scale and offset

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        return {"r": 2, "alpha": 4, "group_size": 8}


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The quantization group of each input feature (in_features,)."""
    return torch.arange(in_features, device=device) // group_size


def fit_groups(w: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (scale, offset), each (out, groups), of the dense (out, in) weight `w`."""
    out, n = w.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:  # repeat the last column: min and max of the short last group are unchanged
        w = torch.cat([w, w[:, -1:].expand(out, pad)], 1)
    w = w.reshape(out, groups, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    return ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8), lo


class L4QDelta(Delta):
    """`lora_A` (r, in), `lora_B` (out, r, init 0), `quant_scale` / `quant_offset` (out, groups)."""

    kind = "weight"
    weight_dependent = True
    identity_at_init = False  # the output at init is Q(W) x + bias: the quantized base

    def __init__(self, base: nn.Module, config: L4QConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        if geo.kind not in ("linear", "transposed"):
            raise TargetError(f"L4Q needs a float matrix layer, '{path}' is a {type(base).__name__}")
        self.r, self.bits = config.r, config.bits
        self.scaling = config.alpha / config.r
        self.group_size = min(config.group_size, geo.in_features)
        self.lora_A = nn.Parameter(torch.empty(config.r, geo.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(geo.out_features, config.r))
        with torch.no_grad():
            scale, offset = fit_groups(layers.dense_weight(base).detach().float(), self.group_size, self.bits)
        self.quant_scale = nn.Parameter(scale)
        self.quant_offset = nn.Parameter(offset)

    def _expanded(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = group_index(n, self.group_size, device)
        return self.quant_scale[:, idx], self.quant_offset[:, idx]

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes in [0, 2^bits - 1] of the dense (out, in) value `v` (with the STE)."""
        scale, offset = self._expanded(v.shape[1], v.device)
        return torch.clamp(RoundSTE.apply((v - offset) / scale), 0, 2 ** self.bits - 1)

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        """Q(w + s B A) for the dense (out, in) base weight `w`."""
        v = w.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
        scale, offset = self._expanded(v.shape[1], v.device)
        return self.codes(v) * scale + offset

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = params["weight"]
        q = self.quantized(layers.to_param_layout(self.base, w))
        return {"weight": layers.to_param_layout(self.base, q).to(w.dtype)}

    def delta_weight(self) -> dict[str, torch.Tensor]:
        w = layers.dense_weight(self.base)
        return {"weight": layers.to_param_layout(self.base, self.quantized(w).to(w.dtype) - w)}

    def merged_write(self, name: str, value: torch.Tensor) -> bool:
        """Write Q(W + s B A) itself: W + (Q - W) in float32 is not always Q."""
        if name != "weight":
            return False
        with torch.no_grad():
            w = self.base.weight
            q = self.quantized(layers.dense_weight(self.base).detach())
            layers.write_param(self.base, "weight", layers.to_param_layout(self.base, q).to(w.dtype))
        return True

    def quantized_state(self) -> dict[str, torch.Tensor | int]:
        """The integer form of Q(W + s B A): uint8 codes (out, in), scale and offset (out, groups)."""
        with torch.no_grad():
            w = layers.dense_weight(self.base).detach()
            v = w.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
            return {"codes": self.codes(v).to(torch.uint8), "scale": self.quant_scale.detach().clone(),
                    "offset": self.quant_offset.detach().clone(), "group_size": self.group_size,
                    "bits": self.bits}


def _l4q_names(model, adapter_names: list[str] | None) -> list[str]:
    names = list(model.active_adapters if adapter_names is None else adapter_names)
    for n in names:
        if not isinstance(model.peft_config.get(n), L4QConfig):
            raise ConfigError(f"adapter '{n}' is not an L4Q adapter")
    return names


def l4q_merge_and_unload(model, adapter_names: list[str] | None = None) -> nn.Module:
    """The plain base model with each adapted weight replaced by its quantized merge Q(W + s B A)
    (dequantized float values, exactly those the L4Q forward used)."""
    return model.merge_and_unload(_l4q_names(model, adapter_names))


def l4q_quantized_state(model, adapter_name: str = "default") -> dict[str, dict]:
    """{site path: {"codes", "scale", "offset", "group_size", "bits"}} of an unmerged L4Q adapter:
    weight = codes * scale + offset (scale and offset repeated over each group of input features)."""
    _l4q_names(model, [adapter_name])
    sites = [site for site in model.sites() if adapter_name in site.deltas]
    if any(adapter_name in site.merged for site in sites):
        raise ConfigError(f"adapter '{adapter_name}' is merged: call l4q_quantized_state before merging")
    return {site.path: site.deltas[adapter_name].quantized_state() for site in sites}


register("l4q", L4QConfig, L4QDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=layers.MATRIX_LAYERS),
         exports=(l4q_merge_and_unload, l4q_quantized_state))
