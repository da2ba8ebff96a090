"""PEANuT (parameter-efficient adaptation with weight-aware neural tweakers): the update is a small network
applied to the frozen weight itself.

Each row of W^T (one input feature's out-vector) goes through A (out -> r), the activation, `depth`
encoder layers (r -> r, activation after each), `depth` decoder layers (r -> r, activation, then the
encoder input of the mirrored level added back), and B (r -> out):

    dW^T = scaling * B(net(act(W^T A^T)))        out = base(x) + x dW^T

B starts at zero (identity at init). The update is a function of the base weight (weight_dependent: core
caches what a merge added) and is linear in x, so merging is exact and every row of a batch is computed
on its own (mixed batches). PEFT's layout (PeanutConfig): peanut_A.weight (r, out), peanut_B.weight
(out, r), peanut_encoders.<i>.weight / peanut_decoders.<i>.weight (r, r). nn.Linear layers only, as in PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.fields import Rule, non_negative_int, positive_int, ruled
from ...core.registry import Capabilities, register
from ._common import LINEAR, flag, kaiming_, up_init_


@dataclass
class PeanutConfig(AdapterConfig):
    """PEANuT (PEFT's PeanutConfig): a width-r network with `depth` encoder/decoder pairs maps W to dW."""

    peft_class = "PeanutConfig"
    peft_type = "PEANUT"

    r: int = positive_int(32)
    depth: int = non_negative_int(0)
    act_fn: str = ruled("relu", Rule(lambda v: isinstance(v, str) and v in ACT2FN,
                                     "an activation name of transformers' ACT2FN, e.g. 'relu' or 'gelu'"))
    scaling: float = ruled(1.0, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                     "a number"))
    init_weights: bool = flag(True)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 4, "depth": 1, "act_fn": "gelu"}


class PeanutDelta(Delta):
    """PEANuT at one Linear: peanut_A, the encoder / decoder stacks and peanut_B."""

    weight_dependent = True  # dW is computed from the base weight
    commutes = False  # another adapter merged first changes the weight this one reads

    def __init__(self, base: nn.Module, config: PeanutConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        out, r = base.out_features, config.r
        self.peanut_A = nn.Linear(out, r, bias=False)
        self.peanut_encoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(config.depth)])
        self.peanut_decoders = nn.ModuleList([nn.Linear(r, r, bias=False) for _ in range(config.depth)])
        self.peanut_B = nn.Linear(r, out, bias=False)
        with torch.no_grad():  # PEFT's draw order: A, encoders, decoders, then B
            for m in (self.peanut_A, *self.peanut_encoders, *self.peanut_decoders):
                kaiming_(m.weight)
        up_init_(self.peanut_B.weight, config.init_weights)
        self.act = ACT2FN[config.act_fn]
        self.scaling = config.scaling

    def update(self) -> torch.Tensor:
        """dW (out, in) from the base layer's current weight, scaling included."""
        h = self.act(layers.dense_weight(self.base).T.to(self.peanut_A.weight.dtype) @ self.peanut_A.weight.T)
        skips = []
        for enc in self.peanut_encoders:
            skips.append(h)
            h = self.act(enc(h))
        for dec, skip in zip(self.peanut_decoders, reversed(skips)):
            h = self.act(dec(h)) + skip
        return (self.scaling * self.peanut_B(h)).T

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw = self.update()
        return base_out + F.linear(x.to(dw.dtype), dw).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": self.update()}


register("peanut", PeanutConfig, PeanutDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=LINEAR, peft_compatible=True))
