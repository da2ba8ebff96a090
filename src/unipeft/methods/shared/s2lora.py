"""S2-LoRA: one globally shared pair of low-rank factors, used by each site through a sparse set
of its own coefficients.

The bank holds A (r, in_max) and B (out_max, r), trained and sliced per site. Each site keeps
`active_ranks` of the r shared rank-one components, chosen by a seeded draw from
(`selection_seed`, site path), and a trained coefficient for each (index + value, like every
sparse delta): delta_W = (alpha / r) * sum_{j in S} c_j B[:, j] A[j, :]. B starts at zero and c at
one (identity at init); A is Kaiming-uniform.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import fraction, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, seeded, widest


@dataclass
class S2LoraConfig(AdapterConfig):
    """S2-LoRA: shared rank r factors; each site uses active_ranks of them (None: all r)."""

    peft_type = "S2LORA"
    not_in_peft = ("exclude_modules", "active_ranks")

    r: int = positive_int(16)
    active_ranks: int | None = positive_int(None, optional=True)
    alpha: float = positive_number(16)
    selection_seed: int = 0
    dropout: float = fraction(0.0, "0 <= dropout < 1")

    def validate(self) -> None:
        super().validate()
        if self.active_ranks is not None and self.active_ranks > self.r:
            raise ConfigError(f"S2LoraConfig.active_ranks: expected at most r={self.r}, got {self.active_ranks}")

    def make_bank(self, model, targets) -> "S2LoraBank":
        return S2LoraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 4, "active_ranks": 2, "alpha": 4}


class S2LoraBank(Bank):
    """The shared trained factors s2_A (r, in_max) and s2_B (out_max, r)."""

    def __init__(self, config: S2LoraConfig, targets) -> None:
        super().__init__()
        out_dim, in_dim = widest(targets)
        a = torch.empty(config.r, in_dim)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.s2_A = nn.Parameter(a)
        self.s2_B = nn.Parameter(torch.zeros(out_dim, config.r))


def selected_ranks(config: S2LoraConfig, path: str) -> torch.Tensor:
    """The sorted indices of the shared components the site at `path` uses."""
    k = config.active_ranks or config.r
    g = seeded(config.selection_seed * 1_000_003 + zlib.crc32(path.encode()))
    return torch.randperm(config.r, generator=g)[:k].sort().values


class S2LoraDelta(FactorDelta):
    """Per-site sparse coefficients: s2_index (which components, saved) and s2_coeff (their weights)."""

    def __init__(self, base: nn.Module, config: S2LoraConfig, path: str, bank: S2LoraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.dropout)
        index = selected_ranks(config, path)
        self.register_buffer("s2_index", index)
        self.s2_coeff = nn.Parameter(torch.ones(len(index)))
        self.scaling = config.alpha / config.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.bank.s2_A[self.s2_index, :self.in_features] * self.s2_coeff[:, None]
        b = self.bank.s2_B[:self.out_features, self.s2_index] * self.scaling
        return a, b


register("s2lora", S2LoraConfig, S2LoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS))
