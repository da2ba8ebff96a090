"""1-bit LoRA (in the spirit of BitDelta / OneBit): LoRA whose factors are sign-quantized.

out = base(x) + s · Q(B) Q(A) x, s = alpha / r, Q(w) = sign(w) · alpha(w) with sign(0) := +1
and alpha(w) = mean |w| over the whole matrix (`scale_granularity="matrix"`) or each row ("row").
The latent float A and B are the trained parameters; Q passes gradients straight through to them
(STE, identity backward). B starts at 0, so alpha(B) = 0 and Q(B) = 0: a fresh adapter is
exactly the identity, and B still gets gradients through the STE.

On disk each factor is its sign bits packed 8 per uint8 byte (`<name>.signs`, rows x ceil(cols / 8))
and its float32 scales (`<name>.scale`): at rank r on an (out, in) layer that is
r (in + out) / 8 bytes plus the scales, ~32x less than fp32 LoRA's 4 r (in + out).
Saving snaps the latent weights in place to their 1-bit values sign(w) · alpha (the output does
not change: alpha is a float64 mean, exact on such rows), so the adapter in memory equals what
the file holds and loading reproduces it exactly. `adapter_storage_bytes` measures any adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import TargetError
from ...core.fields import choice, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._ste import SignScaleSTE

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass
class OneBitLoraConfig(AdapterConfig):
    """1-bit LoRA: out = base(x) + (alpha / r) Q(B) Q(A) x, Q(w) = sign(w) mean|w|."""

    peft_type = "ONEBIT_LORA"
    peft_names = {"alpha": "lora_alpha"}

    r: int = positive_int(8)
    alpha: float = positive_number(8)  # scaling alpha / r (saved as lora_alpha, as LoRA)
    scale_granularity: str = choice("matrix", ("matrix", "row"))  # one scale per factor, or per row

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        return {"r": 2, "alpha": 4}


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """Bits (w >= 0) of a (rows, cols) tensor, 8 per byte, most significant first: (rows, ceil(cols/8)) uint8."""
    rows, cols = w.shape
    bits = (w >= 0).to(torch.uint8)
    pad = (-cols) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    return (bits.view(rows, -1, 8) * _BITS.to(w.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The (rows, cols) bool tensor pack_signs() packed."""
    bits = packed.to(torch.uint8)[..., None] & _BITS.to(packed.device)
    return (bits != 0).reshape(packed.shape[0], -1)[:, :cols]


class OneBitLoraDelta(Delta):
    """Latent `lora_A` (r, in) and `lora_B` (out, r, init 0), used through sign quantization."""

    commutes = True  # additive, as LoRA

    def __init__(self, base: nn.Module, config: OneBitLoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        if geo.kind not in ("linear", "transposed"):
            raise TargetError(f"1-bit LoRA needs a float matrix layer, '{path}' is a {type(base).__name__}")
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.per_row = config.scale_granularity == "row"
        self.lora_A = nn.Parameter(torch.empty(config.r, geo.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(geo.out_features, config.r))

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        """mean |w| (float64 sum: exact on rows of equal magnitude), (rows, 1) or (1, 1)."""
        a = w.detach().abs().to(torch.float64)
        a = a.mean(1, keepdim=True) if self.per_row else a.mean().reshape(1, 1)
        return a.to(w.dtype)

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        """sign(w) · alpha(w), gradients straight through to w."""
        return SignScaleSTE.apply(w, self.alpha(w))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.quantized(self.lora_A), self.quantized(self.lora_B)
        h = F.linear(F.linear(x.to(a.dtype), a), b)
        return base_out + (h * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        dw = self.quantized(self.lora_B) @ self.quantized(self.lora_A) * self.scaling
        return {"weight": layers.to_param_layout(self.base, dw)}

    def snap(self) -> None:
        """Set the latent weights to their 1-bit values sign(w) · alpha(w) (the output is unchanged)."""
        with torch.no_grad():
            for p in (self.lora_A, self.lora_B):
                p.copy_(torch.where(p >= 0, self.alpha(p), -self.alpha(p)))

    def export_state(self) -> dict[str, torch.Tensor]:
        self.snap()
        out = {}
        for name, p in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            out[f"{name}.signs"] = pack_signs(p.detach())
            out[f"{name}.scale"] = self.alpha(p).reshape(-1).to(torch.float32)
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
                positive = unpack_signs(tensors[f"{name}.signs"].to(p.device), p.shape[1])
                scale = tensors[f"{name}.scale"].to(p.device, p.dtype).reshape(-1, 1)
                p.copy_(torch.where(positive, scale, -scale))


def adapter_storage_bytes(model, adapter_name: str = "default") -> int:
    """Bytes of the tensors adapter `adapter_name` saves (any method; safetensors adds a small
    header). Saving a 1-bit adapter snaps its latent weights (see the module docstring)."""
    return sum(t.numel() * t.element_size() for t in model.adapter_state_dict(adapter_name).values())


register("onebit_lora", OneBitLoraConfig, OneBitLoraDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=layers.MATRIX_LAYERS),
         exports=(adapter_storage_bytes,))
