"""DeFT (decompositional fine-tuning): replace a rank-r subspace of the base weight's output space.

For the frozen weight W (out, in), a direction P (out, r) and an injection R (r, in) are learned:

    W' = (I - P_proj) W + Q_P (s R),     so the delta is Q_P (s R - right^T W)

with, by `decomposition_method`, "relu": Q_P = P, right = relu(P) (P_proj = P relu(P)^T, not orthogonal)
or "qr": Q_P = qr(P), right = Q_P (an orthogonal projector). s = alpha / r, or 1 without alpha. R starts
at right^T W / s, so a fresh adapter is the identity. With `para` (PaRa) there is no R: the delta is the
pure removal -P_proj W, trained through P alone (not the identity at init).

The forward adds Q_P (s R x - right^T W x) with W the base's current weight (PEFT subtracts
(out - bias) right Q_P^T from the layer output: the same value, up to rounding). The update depends on
the base weight, so core caches what a merge added (weight_dependent).
PEFT's layout (DeftConfig): deft_P (out, r), deft_R (r, in); r is capped at the layer's out_features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.fields import Rule, choice, fraction, non_negative, positive_int, ruled
from ...core.registry import Capabilities, register
from ._common import MATRIX, flag, only_none_bias, transposed


@dataclass
class DeftConfig(AdapterConfig):
    """DeFT (PEFT's DeftConfig): W' = (I - P_proj) W + Q_P R at rank r; `para` keeps only the removal."""

    peft_class = "DeftConfig"
    peft_type = "DEFT"

    r: int = positive_int(8)
    decomposition_method: str = choice("relu", ["relu", "qr"])
    init_scale: float = non_negative(1.0)
    # None or 0: no scaling of the injection (PEFT's rule); else s = alpha / r
    alpha: float | None = ruled(None, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and v >= 0, "a number >= 0 or None", optional=True))
    para: bool = flag(False)
    fan_in_fan_out: bool = flag(False)
    deft_dropout: float = fraction(0.0, "0 <= deft_dropout < 1")
    init_weights: bool = flag(True)
    bias: str = only_none_bias()

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2}  # s = 1: R x and right^T W x cancel bit for bit at init


class DeftDelta(Delta):
    """DeFT on a Linear / Conv1D: deft_P and (unless para) deft_R."""

    weight_dependent = True  # the removal reads the base weight

    @classmethod
    def create(cls, base, config: DeftConfig, path: str, bank=None, calibration=None) -> "DeftDelta":
        return (DeftParaDelta if config.para else cls)(base, config, path, bank)

    def __init__(self, base: nn.Module, config: DeftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        r = min(config.r, geo.out_features)
        self.method, self.para = config.decomposition_method, config.para
        self.scaling = config.alpha / r if config.alpha else 1.0
        self.dropout = nn.Dropout(config.deft_dropout) if config.deft_dropout > 0 else nn.Identity()
        self.deft_P = nn.Parameter(nn.init.normal_(torch.empty(geo.out_features, r), std=0.02))
        if self.para:
            return
        self.deft_R = nn.Parameter(torch.empty(r, geo.in_features))
        with torch.no_grad():
            if config.init_weights:  # R = right^T W / s: the injection re-adds what the projection removes
                _, right = self.projection()
                self.deft_R.copy_(right.T @ layers.dense_weight(base).to(torch.float32) / self.scaling)
            else:
                nn.init.normal_(self.deft_R, std=0.02 * config.init_scale)

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_P, right) in float32, with P_proj = Q_P @ right^T."""
        p = self.deft_P.to(torch.float32)
        if self.method == "qr":
            q, _ = torch.linalg.qr(p)
            return q, q
        return p, torch.relu(p)

    def removed(self, right: torch.Tensor) -> torch.Tensor:
        """right^T W (r, in) in float32: what the projection takes out of the current base weight."""
        return right.T @ layers.dense_weight(self.base).to(torch.float32)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Q_P (s R x - right^T W x): PEFT's (out - bias) @ right @ Q_P^T term computed from x and W, so a
        # fresh adapter (s R == right^T W) adds exactly zero rather than a rounding residue.
        q, right = self.projection()
        h = x.to(torch.float32)
        inner = -F.linear(h, self.removed(right))
        if not self.para:
            inner = inner + F.linear(self.dropout(h), self.deft_R.to(torch.float32) * self.scaling)
        return base_out + (inner @ q.T).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        q, right = self.projection()
        removed = self.removed(right)
        inner = -removed if self.para else self.deft_R.to(torch.float32) * self.scaling - removed
        return {"weight": layers.to_param_layout(self.base, q @ inner)}


class DeftParaDelta(DeftDelta):
    """PaRa (`para=True`): only the removal -P_proj W; a fresh adapter already changes the output."""

    identity_at_init = False


register("deft", DeftConfig, DeftDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=MATRIX, peft_compatible=True))
