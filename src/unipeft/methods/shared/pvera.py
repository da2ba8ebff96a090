"""PVeRA: probabilistic VeRA. One frozen random pair shared by every site, scaled per site by trained
vectors; the down-projection yields a mean and a log-variance, and the update is sampled from them.

A (2r, in_max) and B (out_max, r) are drawn by Kaiming-uniform from `projection_prng_key` (A first,
then B, one CPU generator) at the widest target's size and sliced per site. With
h = lambda_d * (A x) (2r values) split into mu (first r) and logvar (last r), the site outputs
base(x) + lambda_b * (B z), where z = mu + eps * exp(logvar / 2) while training (or always with
`sample_at_inference`) and z = mu otherwise. Merging uses the mean: delta_W = diag(lambda_b) B
diag(lambda_d[:r]) A[:r]. lambda_b starts at zero (identity at init), lambda_d at `d_initial`.
`generator_seed` gives each site its own CPU noise generator at that seed. With
`save_projection` the bases are stored as `base_model.pvera_A` / `base_model.pvera_B` and checked
against the seed on load; without, they are regenerated from it.
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
class PveraConfig(AdapterConfig):
    """PVeRA (PEFT's PveraConfig): r is the rank of the shared basis (A has 2r rows: mean and log-variance)."""

    peft_class = "PveraConfig"
    peft_type = "PVERA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(256)
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = fraction(0.0, "0 <= pvera_dropout < 1")
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_weights: bool = True
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "PveraBank":
        return PveraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 4, "save_projection": False}


def pvera_bases(seed: int, r: int, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (2r, in_dim), B (out_dim, r)) as `projection_prng_key=seed` generates them."""
    g = seeded(seed)
    a = kaiming_uniform((2 * r, in_dim), g)
    return a, kaiming_uniform((out_dim, r), g)


class PveraBank(SeededBank):
    """The shared frozen pvera_A / pvera_B (buffers; saved only with save_projection)."""

    def __init__(self, config: PveraConfig, targets) -> None:
        super().__init__("PveraConfig.projection_prng_key", config.projection_prng_key, config.save_projection)
        a, b = pvera_bases(config.projection_prng_key, config.r, *widest(targets))
        self.add_basis("pvera_A", a)
        self.add_basis("pvera_B", b)

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


class PveraDelta(FactorDelta):
    """The per-site vectors pvera_lambda_b (out) and pvera_lambda_d (2r), and the site's noise generator."""

    def __init__(self, base: nn.Module, config: PveraConfig, path: str, bank: PveraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.pvera_dropout)
        self.r, self.sample_at_inference = config.r, config.sample_at_inference
        if config.init_weights:
            self.pvera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
            self.pvera_lambda_d = nn.Parameter(torch.full((2 * config.r,), float(config.d_initial)))
        else:  # PEFT's values before its reset: not the identity
            self.pvera_lambda_b = nn.Parameter(torch.ones(self.out_features))
            self.pvera_lambda_d = nn.Parameter(torch.randn(2 * config.r))
        # A plain attribute: a generator is not state (and stays on CPU; the noise is moved instead).
        self.generator = None if config.generator_seed is None else seeded(config.generator_seed)
        # Start in the base layer's mode: a delta added to (or loaded into) an eval model must not sample.
        self.train(base.training)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean's factors (what merging uses)."""
        r = self.r
        a = self.bank.pvera_A[:r, :self.in_features] * self.pvera_lambda_d[:r, None]
        b = self.bank.pvera_B[:self.out_features] * self.pvera_lambda_b[:, None]
        return a, b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.sample_at_inference):
            return super().forward(x, base_out)
        lam_d = self.pvera_lambda_d
        h = lam_d * F.linear(self.dropout(x.to(lam_d.dtype)), self.bank.pvera_A[:, :self.in_features])
        mu, logvar = h.chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        if self.generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.generator).to(std.device)
        out = self.pvera_lambda_b * F.linear(mu + eps * std, self.bank.pvera_B[:self.out_features])
        return base_out + out.to(base_out.dtype)


register("pvera", PveraConfig, PveraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                        peft_compatible=True))
