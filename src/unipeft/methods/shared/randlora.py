"""RandLoRA: a full-rank update from shared frozen random bases with trained diagonal scales.

With n = ceil(min(in, out) / r) bases per site, the update is the sum over the n bases of
B_b diag(lambda[:, b]) A diag(gamma[b]) (scaled by randlora_alpha / r): A (r, 1, min_dim) and B
(max_dim, n_max, r) are drawn once per adapter from `projection_prng_key` (Kaiming-uniform in
bfloat16, A first then each of B's slices, each normalised by its std; or ternary sparse / very
sparse draws) at the widest target's size and sliced per site. lambda (r, n) starts at zero
(identity at init), gamma (n, min_dim) at 1/max(n, min_dim). With `save_projection` the bases
are stored as PEFT does (at the root and under every site); without, they are regenerated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.errors import AdapterLoadError
from ...core.fields import choice, fraction, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, SeededBank, kaiming_uniform, seeded, transposed, widest

_BASES = ("randlora_A", "randlora_B")


@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA (PEFT's RandLoraConfig): r is the rank of each random basis; fewer bases as r grows."""

    peft_class = "RandLoraConfig"
    peft_type = "RANDLORA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(32)
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = fraction(0.0, "0 <= randlora_dropout < 1")
    fan_in_fan_out: bool = False
    randlora_alpha: float = positive_number(640)
    bias: str = choice("none", ["none"])
    init_weights: bool = True

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "RandLoraBank":
        return RandLoraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "randlora_alpha": 4, "save_projection": False}


def n_bases(min_dim: int, r: int) -> int:
    """ceil(min_dim / r): enough rank-r bases for a full-rank update."""
    return math.ceil(min_dim / r)


def randlora_bases(config: RandLoraConfig, out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, 1, min_dim), B (max_dim, n, r)) as `projection_prng_key` generates them (float32)."""
    big, small, r = max(out_dim, in_dim), min(out_dim, in_dim), config.r
    n, g = n_bases(small, r), seeded(config.projection_prng_key)
    if config.sparse or config.very_sparse:
        s = math.sqrt(small) if config.very_sparse else 3
        a, b = torch.rand((r, 1, small), generator=g), torch.rand((big, n, r), generator=g)
        a, b = (torch.where(t < 1 / (2 * s), -1.0, 0.0) + torch.where(t > 1 - 1 / (2 * s), 1.0, 0.0) for t in (a, b))
        return a / a.std(), b / b.std()
    # bfloat16 draws, as the reference implementation makes them on CPU, then float32.
    a = kaiming_uniform((r, 1, small), g, a=math.sqrt(5), dtype=torch.bfloat16)
    b = torch.cat([kaiming_uniform((big, 1, r), g, a=math.sqrt(5), dtype=torch.bfloat16) for _ in range(n)], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


class RandLoraBank(SeededBank):
    """The shared frozen randlora_A / randlora_B (saved only with save_projection)."""

    def __init__(self, config: RandLoraConfig, targets) -> None:
        super().__init__("RandLoraConfig.projection_prng_key", config.projection_prng_key, config.save_projection)
        a, b = randlora_bases(config, *widest(targets))
        self.add_basis("randlora_A", a)
        self.add_basis("randlora_B", b)

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


class RandLoraDelta(FactorDelta):
    """Per-site randlora_lambda (r, n) and randlora_gamma (n, min_dim)."""

    def __init__(self, base: nn.Module, config: RandLoraConfig, path: str, bank: RandLoraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.randlora_dropout)
        self.small, self.big = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        n = n_bases(self.small, config.r)
        self.scaling = config.randlora_alpha / config.r
        self.save_bases = config.save_projection
        if config.init_weights:
            self.randlora_lambda = nn.Parameter(torch.zeros(config.r, n))
            self.randlora_gamma = nn.Parameter(torch.full((n, self.small), 1.0 / max(n, self.small)))
        else:
            self.randlora_lambda = nn.Parameter(torch.randn(config.r, n))
            self.randlora_gamma = nn.Parameter(torch.full((n, self.small), 1.0 / self.big))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.randlora_lambda.shape[1]
        bank = self.bank
        # (r, n, small) -> (r*n, small); (big, n, r) -> (big, n*r): the flattening orders differ, as in PEFT.
        scaled = (self.randlora_lambda[:, :, None] * bank.randlora_A[:, :, :self.small]
                  * self.randlora_gamma[None]).flatten(0, 1)
        basis = bank.randlora_B[:self.big, :n, :].flatten(1)
        if self.small == self.in_features:
            return scaled, basis * self.scaling
        return basis.T, scaled.T * self.scaling

    def export_state(self) -> dict[str, torch.Tensor]:
        out = super().export_state()
        if self.save_bases:  # PEFT stores the shared bases under every site too
            out.update({name: getattr(self.bank, name) for name in _BASES})
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in _BASES:
            if name in tensors and not torch.equal(tensors.pop(name).float(), getattr(self.bank, name)):
                raise AdapterLoadError(f"{self.path}: the stored '{name}' differs from the basis "
                                       f"RandLoraConfig.projection_prng_key={self.bank.seed_value} regenerates; set "
                                       f"RandLoraConfig.projection_prng_key to the seed the file was written with")
        super().import_state(tensors)


register("randlora", RandLoraConfig, RandLoraDelta, Capabilities(mergeable=True, mixed_batch=True,
                                                                 layer_types=LAYERS, peft_compatible=True))
