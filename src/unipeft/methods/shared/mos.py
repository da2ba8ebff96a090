"""MoS (Mixture of Shards): LoRA factors concatenated from shards of global pools shared by all sites.

Every row of A (r, in) and every column of B (out, r) is cut into l = `shards_per_vector` shards
of length ceil(in / l) (ceil(out / l)) (vector sharding). The bank holds two trained global pools,
`pool_A` (pool_size, ceil(in_max / l)) and `pool_B` (pool_size, ceil(out_max / l)); a narrower
site uses the leading part of each pool shard.
Each site routes its r*l shard slots to pool entries by a fixed index matrix (the index
router, drawn from `index_seed` and the site path, saved with the site):
  - subset_selection: each site draws its own subset of the pool (without repeats); off, every
    site uses the same first r*l entries (pure sharing);
  - pair_dissociation: A's and B's slots are routed independently; off, B uses A's indices;
  - shard privatization: the last `private_shards` slots of each factor are the site's own
    trained shards, not shared.
B's pool and private shards start at zero (identity at init); A's are uniform in +-1/sqrt(in_max).
delta_W = (alpha / r) B A.
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
from ...core.fields import fraction, non_negative_int, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, seeded, widest


@dataclass
class MosConfig(AdapterConfig):
    """MoS: rank r, l = shards_per_vector, global pools of pool_size shards, four differentiation switches."""

    peft_type = "MOS"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(8)
    alpha: float = positive_number(16)
    shards_per_vector: int = positive_int(2)
    pool_size: int = positive_int(64)
    private_shards: int = non_negative_int(1)
    subset_selection: bool = True
    pair_dissociation: bool = True
    index_seed: int = 0
    dropout: float = fraction(0.0, "0 <= dropout < 1")

    @property
    def slots(self) -> int:
        """Shard slots per factor of one site: r * shards_per_vector."""
        return self.r * self.shards_per_vector

    def validate(self) -> None:
        super().validate()
        if self.private_shards > self.slots:
            raise ConfigError(f"MosConfig.private_shards: expected at most r * shards_per_vector = {self.slots}, "
                              f"got {self.private_shards}")
        public = self.slots - self.private_shards
        if self.pool_size < public:
            raise ConfigError(f"MosConfig.pool_size: expected at least r * shards_per_vector - private_shards = "
                              f"{public} (the shared slots of one site), got {self.pool_size}")

    def make_bank(self, model, targets) -> "MosBank":
        return MosBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "alpha": 4, "shards_per_vector": 2, "pool_size": 6, "private_shards": 1}


class MosBank(Bank):
    """The two global trained shard pools."""

    def __init__(self, config: MosConfig, targets) -> None:
        super().__init__()
        out_dim, in_dim = widest(targets)
        l = config.shards_per_vector
        bound = 1.0 / math.sqrt(in_dim)
        self.pool_A = nn.Parameter(torch.empty(config.pool_size, math.ceil(in_dim / l)).uniform_(-bound, bound))
        self.pool_B = nn.Parameter(torch.zeros(config.pool_size, math.ceil(out_dim / l)))


def route(config: MosConfig, path: str, factor: str) -> torch.Tensor:
    """The pool indices of a site's shared slots for factor "A" or "B" (int32)."""
    public = config.slots - config.private_shards
    if not config.subset_selection:
        return torch.arange(public, dtype=torch.int32)
    if factor == "B" and not config.pair_dissociation:
        factor = "A"  # B's slots follow A's indices
    g = seeded(config.index_seed * 1_000_003 + zlib.crc32(f"{path}:{factor}".encode()))
    return torch.randperm(config.pool_size, generator=g)[:public].to(torch.int32)


class MosDelta(FactorDelta):
    """Per-site index router (mos_index_A / mos_index_B) and private shards (mos_private_A / _B)."""

    def __init__(self, base: nn.Module, config: MosConfig, path: str, bank: MosBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.dropout)
        self.r, self.scaling = config.r, config.alpha / config.r
        self.register_buffer("mos_index_A", route(config, path, "A"))
        self.register_buffer("mos_index_B", route(config, path, "B"))
        p, l = config.private_shards, config.shards_per_vector
        # This site's shard lengths: pool shards are cut to them, so narrow layers use every slot.
        self.len_A, self.len_B = math.ceil(self.in_features / l), math.ceil(self.out_features / l)
        bound = 1.0 / math.sqrt(bank.pool_A.shape[1] * l)
        self.mos_private_A = nn.Parameter(torch.empty(p, self.len_A).uniform_(-bound, bound))
        self.mos_private_B = nn.Parameter(torch.zeros(p, self.len_B))

    def _assemble(self, pool: torch.Tensor, index: torch.Tensor, private: torch.Tensor, length: int,
                  width: int) -> torch.Tensor:
        """(r, width): the slots' shards (shared, then private), cut to `length`, concatenated per vector
        (l shards each) and cut to `width` (fewer than l entries of each vector's last shard go unused)."""
        shards = torch.cat([pool[index.long(), :length], private.to(pool.dtype)], dim=0)
        return shards.reshape(self.r, -1)[:, :width]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.bank
        a = self._assemble(bank.pool_A, self.mos_index_A, self.mos_private_A, self.len_A, self.in_features)
        b = self._assemble(bank.pool_B, self.mos_index_B, self.mos_private_B, self.len_B, self.out_features)
        return a, b.T * self.scaling


register("mos", MosConfig, MosDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS))
