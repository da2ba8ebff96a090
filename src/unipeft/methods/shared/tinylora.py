"""TinyLoRA: the frozen weight's top-r SVD factors, mixed by an r x r matrix that a tiny trained vector
spans through fixed random tensors; groups of sites may share one vector.

Per site (Linear, GPT-2 Conv1D or Embedding, the weight seen as (out, in); an embedding's as
(vocab, dim)): W = U S V^T, A = sqrt(S_r) V_r^T (r, in) and B = U_r sqrt(S_r) (out, r), with r cut to
min(out, in); both frozen and stored in the file (`tinylora_A`, `tinylora_B`). P (u, r, r) is
normal with std 1/sqrt(r) from a CPU generator at `projection_seed` + the site's index among the
targets (model order). R = sum_i v_i P_i and delta_W = B R A. The trained vectors v (u) live in
the bank, one per group (`base_model.tinylora_v.<group>`): the N targets form
max(1, round(N (1 - weight_tying))) consecutive groups. v starts at zero (identity at init; with
init_weights="uniform" in +-init_v_bound, with False at a uniform draw too, where PEFT leaves it
unset). With `save_projection` each site's P is stored as well and must equal what the seed draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import AdapterLoadError
from ...core.fields import Rule, choice, fraction, positive_int, positive_number, ruled
from ...core.registry import Capabilities, register
from ._common import LAYERS as MATRIX, FactorDelta, seeded, transposed

LAYERS = MATRIX + (nn.Embedding,)


@dataclass
class TinyLoraConfig(AdapterConfig):
    """TinyLoRA (PEFT's TinyLoraConfig): SVD rank r, u trained numbers per group, weight_tying in [0, 1]."""

    peft_class = "TinyLoraConfig"
    peft_type = "TINYLORA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(2)
    u: int = positive_int(64)
    weight_tying: float = ruled(0.0, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and 0.0 <= v <= 1.0, "a number with 0 <= weight_tying <= 1"))
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = positive_number(0.02)
    tinylora_dropout: float = fraction(0.0, "0 <= tinylora_dropout < 1")
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_weights: bool | str = choice(True, [True, False, "uniform"])

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "TinyLoraBank":
        return TinyLoraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "u": 3, "weight_tying": 0.5, "save_projection": False}


class TinyLoraBank(Bank):
    """The trained vectors, one per group of sites, and each site's (index, group)."""

    def __init__(self, config: TinyLoraConfig, targets) -> None:
        super().__init__()
        n = len(targets)
        groups = max(1, round(n * (1.0 - config.weight_tying)))
        size = max(1, n // groups)
        self.site: dict[str, tuple[int, str]] = {
            path: (i, str(min(i // size, groups - 1))) for i, (path, _) in enumerate(targets)}
        self.seed_value = config.projection_seed
        dtypes = {group: module.weight.dtype for (path, module) in reversed(targets)
                  for group in [self.site[path][1]]}  # the dtype of each group's first site
        vectors = {}
        for group, dtype in sorted(dtypes.items(), key=lambda kv: int(kv[0])):
            v = torch.zeros(config.u, dtype=dtype)
            if config.init_weights is not True:
                v.uniform_(-config.init_v_bound, config.init_v_bound)
            vectors[group] = nn.Parameter(v)
        self.tinylora_v = nn.ParameterDict(vectors)

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r', in), B (out, r')) with B A the best rank r' = min(r, out, in) approximation of `weight`."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    k = min(r, *weight.shape)
    root = s[:k].to(weight.dtype).sqrt()
    return (root[:, None] * vh[:k].to(weight.dtype)).contiguous(), (u[:, :k].to(weight.dtype) * root).contiguous()


def projections(seed: int, u: int, r: int) -> torch.Tensor:
    """P (u, r, r), normal with std 1/sqrt(r), from a CPU generator at `seed`."""
    return torch.normal(0.0, 1.0 / r ** 0.5, size=(u, r, r), generator=seeded(seed))


class _TinyLora:
    """What the matrix and embedding deltas share: frozen A, B, P and the group's vector."""

    def _setup(self, weight: torch.Tensor, config: TinyLoraConfig, path: str, bank: TinyLoraBank) -> None:
        index, self.group = bank.site[path]
        a, b = svd_factors(weight, config.r)
        self.register_buffer("tinylora_A", a)
        self.register_buffer("tinylora_B", b)
        self.register_buffer("tinylora_P", projections(config.projection_seed + index, config.u, a.shape[0]),
                             persistent=config.save_projection)

    def mix(self) -> torch.Tensor:
        """R = sum_i v_i P_i (r, r)."""
        v = self.bank.tinylora_v[self.group]
        return torch.einsum("i,ijk->jk", v, self.tinylora_P.to(v.dtype))

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "tinylora_P" in tensors and not torch.equal(tensors["tinylora_P"].to(self.tinylora_P.dtype),
                                                       self.tinylora_P):
            raise AdapterLoadError(f"{self.path}: the stored 'tinylora_P' differs from what TinyLoraConfig."
                                   f"projection_seed={self.bank.seed_value} draws; the file was written with another "
                                   f"seed (set TinyLoraConfig.projection_seed to the one it was trained with)")
        Delta.import_state(self, tensors)


class TinyLoraDelta(_TinyLora, FactorDelta):
    """TinyLoRA on a Linear / Conv1D: out = base(x) + B R A dropout(x)."""

    def __init__(self, base: nn.Module, config: TinyLoraConfig, path: str, bank: TinyLoraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.tinylora_dropout)
        self._setup(layers.dense_weight(base), config, path, bank)

    @classmethod
    def create(cls, base, config, path, bank=None, calibration=None) -> Delta:
        if isinstance(base, nn.Embedding):
            return TinyLoraEmbedding(base, config, path, bank)
        return cls(base, config, path, bank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix() @ self.tinylora_A, self.tinylora_B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # x A^T R^T B^T left to right: the frozen A and B see activations only, so no (r, in) product
        # R A (and its gradient) is formed per step.
        a = self.tinylora_A
        h = F.linear(F.linear(F.linear(self.dropout(x.to(a.dtype)), a), self.mix()), self.tinylora_B)
        return base_out + h.to(base_out.dtype)


class TinyLoraEmbedding(_TinyLora, Delta):
    """TinyLoRA on an Embedding: out = W[ids] + dropout(B[ids]) R A."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Embedding, config: TinyLoraConfig, path: str, bank: TinyLoraBank | None = None) -> None:
        super().__init__(base, config, path, bank)
        self.dropout = nn.Dropout(config.tinylora_dropout) if config.tinylora_dropout > 0 else nn.Identity()
        self._setup(base.weight, config, path, bank)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dtype = base_out.dtype
        low = self.dropout(F.embedding(x, self.tinylora_B.to(dtype)))
        return base_out + low @ self.mix().to(dtype) @ self.tinylora_A.to(dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": self.tinylora_B @ self.mix() @ self.tinylora_A}


register("tinylora", TinyLoraConfig, TinyLoraDelta, Capabilities(mergeable=True, mixed_batch=True,
                                                                 layer_types=LAYERS, peft_compatible=True))
