"""MiSS: one trained shard shared by every column block of a weight (PEFT's MissConfig).

The input dimension is cut into blocks of r columns (the last one shorter when r does not divide
in_features), and every block gets the same update, so `miss_block` B is small:

  balance (init_weights=True, PEFT's default): B (r, out); dW[o, i] = B[i mod r, o]. The forward
      never builds dW: x is padded to a multiple of r, its blocks are summed, then out += sum @ B.
  mini (init_weights="mini"): B (r, mini_r), repeated across out (out must be a multiple of mini_r):
      dW[o, i] = B[i mod r, o mod mini_r].
  bat (init_weights="bat"): B (out/r, r, r), one r x r matrix per row block a, and the update of each
      r x r block of W depends on it: dW_(a, c) = W_(a, c) @ B_a + B_a (r must divide both widths).
      The base runs with W + dW (a weight-side delta); merging records what it added, to undo exactly that.

All three start at zero (the identity); init_weights=False draws balance's B by Kaiming-uniform, as
PEFT does (not the identity). miss_dropout applies to the input of the balance and mini forms.
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
from ...core.fields import choice, fraction, positive_int
from ...core.registry import Capabilities, register
from ._common import DenseDelta, module_error, one_of

INITS = (True, False, "bat", "mini")


@dataclass
class MissConfig(AdapterConfig):
    """MiSS (PEFT's MissConfig): r is the shard width along in_features; init_weights picks the variant."""

    peft_class = "MissConfig"
    peft_type = "MISS"

    r: int = positive_int(64)
    miss_dropout: float = fraction(0.0, "0 <= miss_dropout < 1")
    mini_r: int = positive_int(1)
    init_weights: bool | str = one_of(True, INITS)
    bias: str = choice("none", ["none"])

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """A shard of 2 columns fits every toy layer (the padded form covers odd widths)."""
        return {"r": 2}


class MissDelta(DenseDelta):
    """The shard `miss_block`: (r, out), (r, mini_r) or (out/r, r, r) by variant."""

    def __init__(self, base: nn.Module, config: MissConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        r, out_f, in_f = config.r, self.out_features, self.in_features
        if r > in_f:
            raise module_error("MissConfig.r", path, base, f"at most in_features = {in_f}", r)
        self.variant = {"bat": "bat", "mini": "mini"}.get(config.init_weights, "balance")
        self.r, self.mini_r = r, config.mini_r
        if self.variant == "bat":
            if in_f % r or out_f % r:
                raise module_error("MissConfig.r", path, base, "a divisor of both in_features and out_features "
                                   "(init_weights='bat' cuts the weight into r x r blocks)", r)
            shape = (out_f // r, r, r)
            # The update of each block depends on the base weight: applied to W, cached by core at merge.
            self.kind, self.weight_dependent, self.commutes = "weight", True, False
        elif self.variant == "mini":
            if out_f % config.mini_r:
                raise module_error("MissConfig.mini_r", path, base, f"a divisor of out_features = {out_f}",
                                   config.mini_r)
            shape = (r, config.mini_r)
        else:
            shape = (r, out_f)
        block = torch.zeros(shape)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block = nn.Parameter(block)
        self.identity_at_init = config.init_weights is not False
        self.dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    def _shard(self) -> torch.Tensor:
        """B as an (r, out) matrix (mini: its columns repeated across out)."""
        block = self.miss_block
        return block.repeat(1, self.out_features // self.mini_r) if self.variant == "mini" else block

    def _bat_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """dW for the (out, in) weight `weight`: every r x r block (a, c) gets W_(a, c) @ B_a + B_a."""
        r, b = self.r, self.miss_block
        out_f, in_f = weight.shape
        blocks = weight.to(b.dtype).reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)
        upd = blocks @ b[:, None] + b[:, None]
        return upd.permute(0, 2, 1, 3).reshape(out_f, in_f)

    def matrix(self) -> torch.Tensor:
        if self.variant == "bat":
            return self._bat_delta(layers.dense_weight(self.base))
        cols = torch.arange(self.in_features, device=self.miss_block.device) % self.r
        return self._shard().T[:, cols]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        shard = self._shard()
        h = self.dropout(x.to(shard.dtype))
        pad = -h.shape[-1] % self.r
        if pad:
            h = F.pad(h, (0, pad))
        summed = h.reshape(*h.shape[:-1], h.shape[-1] // self.r, self.r).sum(-2)
        return base_out + (summed @ shard).to(base_out.dtype)

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = params["weight"]
        return {"weight": weight + self._bat_delta(weight).to(weight.dtype)}


register("miss", MissConfig, MissDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
