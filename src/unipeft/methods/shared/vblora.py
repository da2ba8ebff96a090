"""VB-LoRA: LoRA factors assembled from one trained vector bank shared by every site.

Each row of A (r, in) and each column of B (out, r) is cut into sub-vectors of `vector_length`;
every sub-vector is the softmax-weighted sum of the `topk` bank vectors its logits rank highest.
The bank (`num_vectors` x `vector_length`, saved as `base_model.vblora_vector_bank`) and the
per-site logits (`vblora_logits_A` (r, in/L, N), `vblora_logits_B` (out/L, r, N)) train. With
`save_only_topk_weights` the file keeps, per sub-vector, only the top-k indices and the first
k-1 softmax weights (PEFT's layout); loading rebuilds logits that select the same mixture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.errors import ConfigError, TargetError
from ...core.fields import choice, fraction, non_negative, positive_int
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, transposed

_LOGITS = ("vblora_logits_A", "vblora_logits_B")


@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA (PEFT's VBLoRAConfig): rank r, a bank of num_vectors vectors of vector_length, top-k mixing."""

    peft_class = "VBLoRAConfig"
    peft_type = "VBLORA"

    r: int = positive_int(4)
    num_vectors: int = positive_int(256)
    vector_length: int = positive_int(256)
    topk: int = positive_int(2)
    save_only_topk_weights: bool = False
    vblora_dropout: float = fraction(0.0, "0 <= vblora_dropout < 1")
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_vector_bank_bound: float = non_negative(0.02)
    init_logits_std: float = non_negative(0.1)

    def validate(self) -> None:
        super().validate()
        if self.topk > self.num_vectors:
            raise ConfigError(f"VBLoRAConfig.topk: expected at most num_vectors={self.num_vectors}, got {self.topk}")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "VBLoRABank":
        return VBLoRABank(self)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        # vector_length 1 divides every toy layer's width (the real default is 256).
        return {"r": 2, "num_vectors": 16, "vector_length": 1, "topk": 2}


class VBLoRABank(Bank):
    """The trained vector bank, uniform in +-init_vector_bank_bound."""

    def __init__(self, config: VBLoRAConfig) -> None:
        super().__init__()
        bound = config.init_vector_bank_bound
        self.vblora_vector_bank = nn.Parameter(
            torch.empty(config.num_vectors, config.vector_length).uniform_(-bound, bound))

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


def _index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type PEFT stores top-k indices in."""
    for dtype, limit in ((torch.uint8, 2 ** 8), (torch.int16, 2 ** 15), (torch.int32, 2 ** 31)):
        if num_vectors < limit:
            return dtype
    return torch.int64


class VBLoRADelta(FactorDelta):
    """Per-site logits over the bank; A and B are top-k softmax mixtures of bank vectors."""

    identity_at_init = False  # B is a random mixture from the start, as in the paper and PEFT

    def __init__(self, base: nn.Module, config: VBLoRAConfig, path: str, bank: VBLoRABank | None = None) -> None:
        super().__init__(base, config, path, bank, config.vblora_dropout)
        length = config.vector_length
        for what, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % length:
                raise TargetError(f"VBLoRAConfig.vector_length={length} must divide the {what} ({size}) of "
                                  f"'{path}'; choose a vector_length dividing every target's width")
        self.topk, self.top_only, self.num_vectors = config.topk, config.save_only_topk_weights, config.num_vectors
        std = config.init_logits_std
        self.vblora_logits_A = nn.Parameter(torch.randn(config.r, self.in_features // length, config.num_vectors) * std)
        self.vblora_logits_B = nn.Parameter(
            torch.randn(self.out_features // length, config.r, config.num_vectors) * std)

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        weights, idx = logits.topk(self.topk, dim=-1)
        return (F.softmax(weights, dim=-1).unsqueeze(-1) * self.bank.vblora_vector_bank[idx]).sum(-2)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._mix(self.vblora_logits_A).reshape(self.vblora_logits_A.shape[0], -1)
        b = self._mix(self.vblora_logits_B).transpose(1, 2).reshape(-1, self.vblora_logits_B.shape[1])
        return a, b

    def export_state(self) -> dict[str, torch.Tensor]:
        if not self.top_only:
            return super().export_state()
        out = {}
        for name in _LOGITS:
            logits, idx = getattr(self, name).detach().topk(self.topk, dim=-1)
            out[f"{name}_topk_indices"] = idx.to(_index_dtype(self.num_vectors))
            out[f"{name}_topk_weights"] = F.softmax(logits, dim=-1)[..., :-1].contiguous()
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.top_only:
            return super().import_state(tensors)
        with torch.no_grad():
            for name in _LOGITS:
                idx = tensors[f"{name}_topk_indices"].to(torch.long)
                w = tensors[f"{name}_topk_weights"].to(torch.float32)
                w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
                target = getattr(self, name)
                full = torch.full(target.shape, float("-inf")).scatter(-1, idx, torch.log(w))
                target.copy_(full.to(target.dtype))


register("vblora", VBLoRAConfig, VBLoRADelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                           peft_compatible=True))
