"""DeLoRA (Bini et al. 2025, "Decoupled Low-rank Adaptation"): a low-rank update whose direction and
strength are learned apart.

    dW = (lambda / r) * B diag(1 / (||a_i|| ||b_i||)) A * diag(||W_:,j||)

Each rank-one term b_i a_i is normalised to unit norm, so the update's Frobenius norm is bounded by
lambda times the column norms of the frozen weight, whatever A and B learn; lambda (one scalar per
layer, initialised to `delora_lambda`) is trained and sets the strength. ||W_:,j|| (the base
weight's column norms) is measured once when the delta is created and stored with the adapter
(PEFT's `delora_w_norm` buffer), so merging never re-reads the weight it changed.

PEFT's DeloraConfig / DeloraLinear layout: keys `delora_A` (r, in), `delora_B` (out, r),
`delora_lambda` (1,), `delora_w_norm` (in,); dropout (`module_dropout`) acts on the input as in
PEFT. B starts at zero (init_weights=True), so a fresh adapter is the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import fraction, positive_int, positive_number
from ..core.registry import Capabilities, register
from ..core.targets import pattern_key

NORM_FLOOR = 1e-4  # PEFT clamps the rank-one norms at this value (B starts at zero)


@dataclass
class DeloraConfig(AdapterConfig):
    """DeLoRA: out = base(x) + (lambda/r) B diag(1/(|a_i| |b_i|)) A (||W_:,j|| * dropout(x))."""

    peft_class = "DeloraConfig"
    peft_type = "DELORA"

    r: int = positive_int(8)
    delora_lambda: float = positive_number(15)
    module_dropout: float = fraction(0.0, "0 <= module_dropout < 1")
    bias: str = "none"
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.bias != "none":
            raise ConfigError(f"DeloraConfig.bias: only 'none' is supported (use BitFitConfig to train biases), "
                              f"got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"DeloraConfig.init_weights: expected True or False, got {self.init_weights!r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"DeloraConfig.rank_pattern[{key!r}]: expected a positive integer, got {r!r}")
        for key, lam in self.lambda_pattern.items():
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam <= 0:
                raise ConfigError(f"DeloraConfig.lambda_pattern[{key!r}]: expected a positive number, got {lam!r}")

    def rank_and_lambda(self, path: str) -> tuple[int, float]:
        """The rank and initial lambda of the module at `path` (rank_pattern / lambda_pattern win)."""
        rk, lk = pattern_key(self.rank_pattern, path), pattern_key(self.lambda_pattern, path)
        return (self.rank_pattern[rk] if rk else self.r), (self.lambda_pattern[lk] if lk else self.delora_lambda)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "delora_lambda": 4}


class DeloraDelta(Delta):
    """DeLoRA on an nn.Linear (see the module docstring)."""

    commutes = True  # additive, and computed from stored tensors only

    def __init__(self, base: nn.Linear, config: DeloraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        self.r, lam = config.rank_and_lambda(path)
        self.delora_A = nn.Parameter(torch.empty(self.r, geo.in_features))
        self.delora_B = nn.Parameter(torch.empty(geo.out_features, self.r))
        # Drawn in PEFT's order (A, then B when it is not zero), so a seed gives PEFT's tensors.
        nn.init.kaiming_uniform_(self.delora_A, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.delora_B)
        else:
            nn.init.kaiming_uniform_(self.delora_B, a=math.sqrt(5))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(lam)))
        with torch.no_grad():
            w_norm = layers.dense_weight(base).detach().to(torch.float32).norm(dim=0)
        self.register_buffer("delora_w_norm", w_norm.to(self.delora_A.dtype))
        self.delora_dropout = nn.Dropout(config.module_dropout) if config.module_dropout > 0 else nn.Identity()

    def rank_scales(self) -> torch.Tensor:
        """(lambda / r) / (||a_i|| ||b_i||) per rank i, the norms floored at 1e-4 as PEFT does."""
        a_norm = self.delora_A.norm(dim=1).clamp(min=NORM_FLOOR)
        b_norm = self.delora_B.norm(dim=0).clamp(min=NORM_FLOOR)
        return (self.delora_lambda / self.r) / (a_norm * b_norm)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a = self.delora_A
        h = self.delora_dropout(x if x.dtype == a.dtype else x.to(a.dtype))
        h = F.linear(h * self.delora_w_norm, a) * self.rank_scales()
        return base_out + F.linear(h, self.delora_B).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        dense = (self.delora_B * self.rank_scales()) @ self.delora_A * self.delora_w_norm[None, :]
        return {"weight": layers.to_param_layout(self.base, dense)}


register("delora", DeloraConfig, DeloraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,),
                                                           quantized_base=False, peft_compatible=True))
