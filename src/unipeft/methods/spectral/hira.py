"""HiRA: a high-rank update as the Hadamard product of the frozen weight with a low-rank matrix.

For a target with weight W0, HiRA trains A (r, in) and B (out, r) and adds dW = W0 * (B @ A)
(elementwise), so out = base(x) + x @ dW^T. The rank of dW is not bounded by r: W0's structure is
kept and re-weighted entry by entry. The same holds for Embedding (dW = W0 * (B @ A)^T, looked up
by the token ids) and for Conv1d/2d/3d (B @ A over the flattened kernel, reshaped to W0's shape).

Keys are PEFT's: `hira_A`, `hira_B` (Linear, GPT-2 Conv1D, convolutions; conv A is (r, in, *kernel),
B is (out, r, 1, ...)) and `hira_embedding_A` (r, num_embeddings), `hira_embedding_B` (dim, r).
PEFT's default init (init_weights=True) draws A Kaiming-uniform and sets B to zero, "gaussian"
draws A from N(0, 1/r) instead; on Embedding A is zero and B standard normal. Both are the identity;
init_weights=False draws both factors from a standard normal.

dW reads the base weight, so the delta is `weight_dependent`: core keeps what it merged to undo it
exactly. Two HiRA adapters stacked on one site add their updates of the same W0 in forward, while
merging them one after the other re-weights the already merged weight: stacking does not commute
with merging, and the deltas say so (`commutes` False). Each row's update depends only on that
row, so a mixed batch (one adapter per row) equals one forward per adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import TargetError
from ...core.fields import fraction, positive_int
from ...core.registry import Capabilities, register
from ._common import one_of


@dataclass
class HiraConfig(AdapterConfig):
    """HiRA (PEFT's HiraConfig): dW = W0 * (B @ A) with rank-r factors at every target.

    PEFT's HiRA builds each new layer with `r` whatever `rank_pattern` says (the pattern only reaches
    layers that already hold a HiRA adapter), so its files always have rank r: a non-empty rank_pattern
    is refused rather than honoured, which would write files PEFT cannot load."""

    peft_class = "HiraConfig"
    peft_type = "HIRA"
    peft_inert = {"rank_pattern": {}}

    r: int = positive_int(32)
    hira_dropout: float = fraction(0.0)
    fan_in_fan_out: bool = False
    init_weights: bool | str = one_of(True, (True, False, "gaussian"))

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """What PEFT records for GPT-2's transposed Conv1D."""
        return {"fan_in_fan_out": any(layers.is_transposed(m) for _, m in targets)}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """A small rank that fits every toy layer."""
        return {"r": 2}


class HiraDelta(Delta):
    """Shared HiRA state (rank, dropout); `create` picks the class for the layer type."""

    weight_dependent = True  # dW = W0 * (B @ A) reads the base weight: core caches the merged delta
    commutes = False  # stacked adapters add updates of W0; sequential merges re-weight the merged weight

    def __init__(self, base: nn.Module, config: HiraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.r = config.r
        self.hira_dropout = nn.Dropout(config.hira_dropout) if config.hira_dropout > 0 else nn.Identity()
        self.identity_at_init = config.init_weights is not False

    @classmethod
    def create(cls, base: nn.Module, config: HiraConfig, path: str, bank=None, calibration=None) -> Delta:
        if isinstance(base, nn.Embedding):
            return HiraEmbedding(base, config, path, bank)
        if isinstance(base, layers.CONVS):
            return HiraConv(base, config, path, bank)
        if layers.is_matrix_layer(base):
            return HiraLinear(base, config, path, bank)
        raise TargetError(f"HiRA does not support '{path}' of type {type(base).__name__}")


class HiraLinear(HiraDelta):
    """HiRA on Linear and GPT-2 Conv1D: A (r, in), B (out, r); dW = W0 * (B @ A) on the (out, in) view."""

    def __init__(self, base: nn.Module, config: HiraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        self.hira_A = nn.Parameter(torch.randn(self.r, geo.in_features))
        self.hira_B = nn.Parameter(torch.randn(geo.out_features, self.r))
        with torch.no_grad():
            if config.init_weights is True:
                nn.init.kaiming_uniform_(self.hira_A, a=math.sqrt(5))
            elif config.init_weights == "gaussian":
                nn.init.normal_(self.hira_A, std=1 / self.r)
            if config.init_weights is not False:
                nn.init.zeros_(self.hira_B)

    def matrix(self) -> torch.Tensor:
        """dW as a dense (out, in) matrix."""
        w = layers.dense_weight(self.base)
        return w.to(self.hira_A.dtype) * (self.hira_B @ self.hira_A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.hira_dropout(x.to(self.hira_A.dtype))
        return base_out + F.linear(h, self.matrix()).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.matrix())}


class HiraEmbedding(HiraDelta):
    """HiRA on nn.Embedding: A (r, num_embeddings), B (dim, r); dW = W0 * (B @ A)^T, looked up by id."""

    def __init__(self, base: nn.Embedding, config: HiraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.hira_embedding_A = nn.Parameter(torch.randn(self.r, base.num_embeddings))
        self.hira_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, self.r))
        if config.init_weights is not False:  # either init: A zero, B as nn.Embedding draws its weight
            with torch.no_grad():
                nn.init.zeros_(self.hira_embedding_A)
                nn.init.normal_(self.hira_embedding_B)

    def matrix(self) -> torch.Tensor:
        """dW in the embedding's (num_embeddings, dim) layout."""
        mod = self.hira_embedding_B @ self.hira_embedding_A
        return self.base.weight.to(mod.dtype) * mod.T

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # A plain lookup, as PEFT does: the padding row's update trains like any other row.
        return base_out + F.embedding(x, self.matrix()).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": self.matrix()}


class HiraConv(HiraDelta):
    """HiRA on Conv1d/2d/3d: A (r, in, *kernel), B (out, r, 1, ...); dW = W0 * (B @ A) reshaped to W0."""

    def __init__(self, base: nn.Module, config: HiraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if base.groups != 1:
            raise TargetError(f"HiRA on '{path}': grouped convolutions (groups={base.groups}) are not supported: "
                              f"W0 * (B @ A) needs one weight entry per (out, in) channel pair")
        ones = (1,) * len(base.kernel_size)
        self.hira_A = nn.Parameter(torch.randn(self.r, base.in_channels, *base.kernel_size))
        self.hira_B = nn.Parameter(torch.randn(base.out_channels, self.r, *ones))
        if config.init_weights is not False:  # "gaussian" too: PEFT's conv layers draw A Kaiming-uniform
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.hira_A, a=math.sqrt(5))
                nn.init.zeros_(self.hira_B)

    def matrix(self) -> torch.Tensor:
        """dW in the conv weight's (out, in, *kernel) shape."""
        w = self.base.weight
        mod = (self.hira_B.flatten(1) @ self.hira_A.flatten(1)).view(w.shape)
        return w.to(mod.dtype) * mod

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.hira_dropout(x.to(self.hira_A.dtype))
        # The base's own conv (stride, padding, padding mode, dilation) with dW and no bias, so the unmerged
        # output equals the merged layer's for every padding mode (PEFT zero-pads whatever the mode says).
        return base_out + self.base._conv_forward(h, self.matrix(), None).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": self.matrix()}


register("hira", HiraConfig, HiraDelta,
         Capabilities(mergeable=True, mixed_batch=True,
                      layer_types=layers.MATRIX_LAYERS + (nn.Embedding,) + layers.CONVS, peft_compatible=True))
