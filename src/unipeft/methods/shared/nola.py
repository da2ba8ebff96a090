"""NOLA: LoRA factors as linear combinations of seeded random basis matrices; only the mixture
coefficients train and are saved.

A = sum_i alpha_i A_i (r, in) and B = sum_j beta_j B_j (out, r), scaled by alpha / r. The bases
(`num_basis_A` of A's shape, `num_basis_B` of B's, Kaiming-uniform from one CPU generator at
`basis_seed`, drawn once at the widest target's size and sliced per site) are shared by every
site and never stored: the file holds the per-site coefficients (`nola_alpha`, `nola_beta`) and
a small fingerprint of the bases, so a file whose seed regenerates other bases is refused on load.
beta starts at zero (identity at init), alpha uniform in +-1/sqrt(num_basis_A).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.fields import fraction, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, SeededBank, kaiming_uniform, seeded, widest


@dataclass
class NolaConfig(AdapterConfig):
    """NOLA: rank r, num_basis_A / num_basis_B seeded bases per factor, trained coefficients only."""

    peft_type = "NOLA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(8)
    alpha: float = positive_number(8)
    num_basis_A: int = positive_int(1024)
    num_basis_B: int = positive_int(1024)
    basis_seed: int = 0
    dropout: float = fraction(0.0, "0 <= dropout < 1")

    def make_bank(self, model, targets) -> "NolaBank":
        return NolaBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "alpha": 4, "num_basis_A": 6, "num_basis_B": 5}


def nola_bases(config: NolaConfig, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A bases (num_basis_A, r, in_dim), B bases (num_basis_B, out_dim, r)) from `basis_seed`."""
    g = seeded(config.basis_seed)
    a = torch.stack([kaiming_uniform((config.r, in_dim), g) for _ in range(config.num_basis_A)])
    b = torch.stack([kaiming_uniform((out_dim, config.r), g) for _ in range(config.num_basis_B)])
    return a, b


class NolaBank(SeededBank):
    """The shared frozen bases (regenerated, never stored) and their stored fingerprint."""

    def __init__(self, config: NolaConfig, targets) -> None:
        super().__init__("NolaConfig.basis_seed", config.basis_seed, save_bases=False)
        a, b = nola_bases(config, *widest(targets))
        self.add_basis("basis_A", a)
        self.add_basis("basis_B", b)
        self.add_fingerprint()


class NolaDelta(FactorDelta):
    """Per-site mixture coefficients nola_alpha (num_basis_A) and nola_beta (num_basis_B)."""

    def __init__(self, base: nn.Module, config: NolaConfig, path: str, bank: NolaBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.dropout)
        bound = 1.0 / math.sqrt(config.num_basis_A)
        self.nola_alpha = nn.Parameter(torch.empty(config.num_basis_A).uniform_(-bound, bound))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B))
        self.scaling = config.alpha / config.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.einsum("k,kri->ri", self.nola_alpha, self.bank.basis_A[:, :, :self.in_features])
        b = torch.einsum("k,kor->or", self.nola_beta, self.bank.basis_B[:, :self.out_features])
        return a, b * self.scaling


register("nola", NolaConfig, NolaDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS))
