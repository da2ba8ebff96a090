"""GraLoRA (granular low-rank adaptation): LoRA split into k x k blocks, each with its own rank r/k factors.

The input is cut into k slices of in/k features and the output into k slices of out/k. Slice n of the
input has a factor A_n (in/k, r); its r outputs are cut into k chunks of r/k, chunk j feeding output
slice j. Output slice j has a factor B_j (r, out/k) reading the k chunks addressed to it. Block (j, n) of
the update is therefore A_n[:, chunk j] @ B_j[chunk n] (rank r/k): the same parameter count as LoRA of
rank r, with total rank up to k * r. Optional `hybrid_r` adds a plain LoRA pair next to the blocks.

    out = base(x) + alpha / (r + hybrid_r) * (blocks(x) + B_h A_h x)

PEFT's layout (GraloraConfig): gralora_A (k, in/k, r), gralora_B (k, r, out/k), and with hybrid_r > 0
gralora_A_general.weight (hybrid_r, in) / gralora_B_general.weight (out, hybrid_r). B starts at zero
(identity at init). Every row of a batch is computed on its own, so mixed batches are supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import fraction, non_negative_int, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import MATRIX, flag, kaiming_, only_none_bias, shape_error, transposed, up_init_


@dataclass
class GraloraConfig(AdapterConfig):
    """GraLoRA (PEFT's GraloraConfig): rank r in gralora_k x gralora_k blocks, plus an optional hybrid LoRA."""

    peft_class = "GraloraConfig"
    peft_type = "GRALORA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(32)
    hybrid_r: int = non_negative_int(0)
    alpha: float = positive_number(64)
    gralora_dropout: float = fraction(0.0, "0 <= gralora_dropout < 1")
    gralora_k: int = positive_int(2)
    fan_in_fan_out: bool = flag(False)
    bias: str = only_none_bias()
    init_weights: bool = flag(True)

    def validate(self) -> None:
        super().validate()
        if self.r % self.gralora_k:
            raise ConfigError(f"GraloraConfig.r: expected a multiple of gralora_k={self.gralora_k} (each of the "
                              f"k x k blocks gets rank r / gralora_k), got {self.r}")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        # The toy models hold layers of odd width (a 5- or 3-way head), which no k > 1 divides; the block
        # path with k > 1 is covered by tests/methods/test_lowrank.py and the PEFT parity tests.
        return {"r": 2, "hybrid_r": 1, "alpha": 4, "gralora_k": 1}


class GraloraDelta(Delta):
    """GraLoRA on a Linear / Conv1D: block factors gralora_A / gralora_B and the optional hybrid pair."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Module, config: GraloraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        k, r = config.gralora_k, config.r
        for name, size in (("in", geo.in_features), ("out", geo.out_features)):
            if size % k:
                raise shape_error("GraloraConfig", "gralora_k", path,
                                  f"has {size} {name}put features, which gralora_k={k} does not divide")
        self.k, self.r, self.hybrid_r = k, r, config.hybrid_r
        self.in_features, self.out_features = geo.in_features, geo.out_features
        self.scaling = config.alpha / (r + config.hybrid_r)
        self.dropout = nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0 else nn.Identity()
        a_blocks, b_blocks = [], []
        for _ in range(k):  # PEFT's draw order: A_n then B_n, block by block
            a = kaiming_(torch.empty(r, self.in_features // k))
            b = up_init_(torch.empty(self.out_features // k, r), config.init_weights)
            a_blocks.append(a)
            b_blocks.append(b)
        self.gralora_A = nn.Parameter(torch.stack(a_blocks).transpose(1, 2).contiguous())  # (k, in/k, r)
        self.gralora_B = nn.Parameter(torch.stack(b_blocks).transpose(1, 2).contiguous())  # (k, r, out/k)
        if config.hybrid_r > 0:
            self.gralora_A_general = nn.Linear(self.in_features, config.hybrid_r, bias=False)
            self.gralora_B_general = nn.Linear(config.hybrid_r, self.out_features, bias=False)
            kaiming_(self.gralora_A_general.weight.data)
            up_init_(self.gralora_B_general.weight, config.init_weights)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The block-structured product for x (..., in) -> (..., out), unscaled."""
        k, s = self.k, self.r // self.k
        lead = x.shape[:-1]
        h = torch.einsum("tni,nir->tnr", x.reshape(-1, k, self.in_features // k), self.gralora_A)
        # chunk j of every input slice's r outputs goes to output slice j
        h = h.view(-1, k, k, s).transpose(1, 2).reshape(-1, k, k * s)
        return torch.einsum("tjr,jro->tjo", h, self.gralora_B).reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.gralora_A.dtype))
        out = self._blocks(h)
        if self.hybrid_r > 0:
            out = out + self.gralora_B_general(self.gralora_A_general(h))
        return base_out + (self.scaling * out).to(base_out.dtype)

    def dense_update(self) -> torch.Tensor:
        """The (out, in) update matrix, scaling included."""
        k, s = self.k, self.r // self.k
        a = self.gralora_A.view(k, self.in_features // k, k, s)           # [n, i, j, s]
        b = self.gralora_B.view(k, k, s, self.out_features // k)         # [j, n, s, o]
        w_t = torch.einsum("nijs,jnso->nijo", a, b).reshape(self.in_features, self.out_features)
        w = w_t.T
        if self.hybrid_r > 0:
            w = w + self.gralora_B_general.weight @ self.gralora_A_general.weight
        return self.scaling * w

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.dense_update())}


register("gralora", GraloraConfig, GraloraDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=MATRIX, peft_compatible=True))

__all__ = ["GraloraConfig", "GraloraDelta"]
