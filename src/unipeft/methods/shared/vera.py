"""VeRA: one pair of frozen random matrices shared by every site, scaled per site by two trained vectors.

out = base(x) + diag(lambda_b) B diag(lambda_d) A x, with A (r, in_max) and B (out_max, r) drawn by
Kaiming-uniform from `projection_prng_key` (A first, then B, from one CPU generator) at the widest
target's size and sliced per site. lambda_b starts at zero (identity at init), lambda_d at
`d_initial`. With `save_projection=False` the file holds only the vectors and A/B are regenerated
from the seed on load; with True they are stored as `base_model.vera_A` / `base_model.vera_B`
(PEFT's layout) and checked against the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import AdapterConfig
from ...core.fields import choice, fraction, positive_int
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, SeededBank, kaiming_uniform, seeded, transposed, widest


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA (PEFT's VeraConfig): r is the shared random basis' rank; only lambda_b / lambda_d train."""

    peft_class = "VeraConfig"
    peft_type = "VERA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(256)
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = fraction(0.0, "0 <= vera_dropout < 1")
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_weights: bool = True

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "VeraBank":
        return VeraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 4, "save_projection": False}


def vera_bases(seed: int, r: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in_dim), B (out_dim, r)) as `projection_prng_key=seed` generates them."""
    g = seeded(seed)
    a = kaiming_uniform((r, in_dim), g)
    return a, kaiming_uniform((out_dim, r), g)


class VeraBank(SeededBank):
    """The shared frozen vera_A / vera_B (buffers: never trained; saved only with save_projection)."""

    def __init__(self, config: VeraConfig, targets) -> None:
        super().__init__("VeraConfig.projection_prng_key", config.projection_prng_key, config.save_projection)
        a, b = vera_bases(config.projection_prng_key, config.r, *widest(targets))
        self.add_basis("vera_A", a)
        self.add_basis("vera_B", b)

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


class VeraDelta(FactorDelta):
    """The per-site vectors vera_lambda_b (out) and vera_lambda_d (r)."""

    def __init__(self, base: nn.Module, config: VeraConfig, path: str, bank: VeraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.vera_dropout)
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        else:  # PEFT's values before its reset: not the identity
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.bank.vera_A[:, :self.in_features] * self.vera_lambda_d[:, None]
        b = self.bank.vera_B[:self.out_features] * self.vera_lambda_b[:, None]
        return a, b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # The vectors scale activations, not the frozen bases: no (r, in) / (out, r) gradient is formed.
        a, b = self.bank.vera_A[:, :self.in_features], self.bank.vera_B[:self.out_features]
        h = F.linear(self.dropout(x.to(a.dtype)), a) * self.vera_lambda_d
        return base_out + (F.linear(h, b) * self.vera_lambda_b).to(base_out.dtype)


register("vera", VeraConfig, VeraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     peft_compatible=True))
