"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a low-rank Hadamard product update.

    dW = (alpha / r) * (W1a @ W1b) * (W2a @ W2b)        (elementwise product of two rank-r matrices)

The product of two rank-r matrices has rank up to r^2, at the parameter cost of 2r(out + in). On a
conv layer the matrices are (out, in * k1 * k2) and reshaped to the kernel, or, with
`use_effective_conv2d` and a kernel larger than 1, each factor is a CP product of a (r, r, k1, k2) core
`hada_t{1,2}` with (r, out) / (r, in) factors (Conv1d: a (r, r, k, 1) core).

PEFT's LoHaConfig / LoHa layer layout: keys hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1,
hada_t2). hada_w2_b starts at zero (init_weights=True), so a fresh adapter is the identity; the other
factors get the uniform He init, drawn in PEFT's order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.registry import Capabilities, register
from ._common import LAYERS, LycorisConfig, LycorisDelta, cp_rebuild, effective_conv, flag, kaiming_, new_param


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: out = base(x) + x (*) dW with dW = (alpha/r) (W1a W1b) o (W2a W2b); (*) the base's linear/conv op."""

    peft_class = "LoHaConfig"
    peft_type = "LOHA"

    init_weights: bool = flag(True)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Rank 2, and the CP form on convs with a kernel."""
        return {"r": 2, "alpha": 4, "use_effective_conv2d": True}


class LoHaDelta(LycorisDelta):
    """LoHa on an nn.Linear, nn.Conv1d or nn.Conv2d (see the module docstring)."""

    rank_drop_scale = True  # PEFT always renormalises LoHa's rank-dropout mask

    def __init__(self, base: nn.Module, config: LoHaConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        w, r = base.weight, self.r
        out_dim, in_dim = w.shape[0], w.shape[1]  # conv: in_channels / groups
        kernel = tuple(w.shape[2:])
        self.cp = effective_conv(config, base)
        if self.cp:
            k1, k2 = (kernel + (1,))[:2]  # a Conv1d kernel k is a (k, 1) core
            for i in (1, 2):
                setattr(self, f"hada_t{i}", new_param(r, r, k1, k2, like=w))
                setattr(self, f"hada_w{i}_a", new_param(r, out_dim, like=w))
                setattr(self, f"hada_w{i}_b", new_param(r, in_dim, like=w))
        else:
            flat_in = in_dim * math.prod(kernel)
            for i in (1, 2):
                setattr(self, f"hada_w{i}_a", new_param(out_dim, r, like=w))
                setattr(self, f"hada_w{i}_b", new_param(r, flat_in, like=w))
        self._init(config.init_weights)

    def _init(self, init_weights: bool) -> None:
        """He init everywhere; hada_w2_b zero when init_weights (the update w1 o w2 is then zero)."""
        with torch.no_grad():
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
                kaiming_(getattr(self, name))
            if init_weights:
                nn.init.zeros_(self.hada_w2_b)
            else:
                kaiming_(self.hada_w2_b)
            if self.cp:
                kaiming_(self.hada_t1)
                kaiming_(self.hada_t2)

    def dense_update(self) -> torch.Tensor:
        if self.cp:
            w1 = cp_rebuild(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = cp_rebuild(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w1 = self.hada_w1_a @ self.hada_w1_b
            w2 = self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2 * self.scaling).reshape(self.base.weight.shape)


register("loha", LoHaConfig, LoHaDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     quantized_base=False, peft_compatible=True))
