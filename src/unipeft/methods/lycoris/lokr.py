"""LoKr (Yeh et al. 2023, LyCORIS): a Kronecker product update.

    dW = (alpha / r) * kron(W1, W2),   W1: (a, c),  W2: (b, d),  out = a * b,  in = c * d

(a, b) and (c, d) split the output and input widths by `factorization` (two divisors near the square root,
or one equal to `decompose_factor`). W2 is stored whole when r >= max(b, d) / 2, else as W2a @ W2b of rank
r; W1 is stored whole unless `decompose_both` and r < max(a, c) / 2. On a conv layer W2 carries the kernel:
whole (b, d, k1, k2), a CP product of a (r, r, k1, k2) core `lokr_t2` with (r, b) / (r, d) factors
(`use_effective_conv2d`, kernel larger than 1), or flat (b, r) @ (r, d * k1 * k2).

PEFT's LoKrConfig / LoKr layer layout: keys lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b
(+ lokr_t2). W1 (or W1a) starts at zero with init_weights=True, W2 (or W2b) with init_weights="lycoris",
so a fresh adapter is the identity either way; the other factors get the uniform He init in PEFT's order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.fields import Rule, ruled
from ...core.registry import Capabilities, register
from ._common import LAYERS, LycorisConfig, LycorisDelta, cp_rebuild, effective_conv, flag, kaiming_, new_param


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m * n == dimension, as LyCORIS does.

    A positive `factor` that divides `dimension` gives (factor, dimension // factor) as is. Otherwise
    m steps through the divisors of `dimension` from 1 while m < n and m stays <= factor (-1: no bound),
    and the pair is returned smaller first: (8, 16) for 128, (1, 127) for 127, (4, 32) for 128 and 4.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (m, n) if m <= n else (n, m)


def _lokr_init(v: Any) -> bool:
    return v is True or v is False or v == "lycoris"


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: out = base(x) + x (*) dW with dW = (alpha/r) kron(W1, W2); (*) the base's linear/conv op."""

    peft_class = "LoKrConfig"
    peft_type = "LOKR"

    decompose_both: bool = flag(False)
    decompose_factor: int = ruled(-1, Rule(lambda v: isinstance(v, int) and not isinstance(v, bool)
                                           and (v == -1 or v > 0), "-1 (divisors near the square root) or a "
                                           "positive integer"))
    rank_dropout_scale: bool = flag(False)
    init_weights: bool | str = ruled(True, Rule(_lokr_init, "True, False or 'lycoris'"))

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Rank 1 with both sides decomposed and the CP core on convs: every factor form is built."""
        return {"r": 1, "alpha": 2, "decompose_both": True, "use_effective_conv2d": True}


class LoKrDelta(LycorisDelta):
    """LoKr on an nn.Linear, nn.Conv1d or nn.Conv2d (see the module docstring)."""

    def __init__(self, base: nn.Module, config: LoKrConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.rank_drop_scale = bool(config.rank_dropout_scale)
        w, r = base.weight, self.r
        kernel = tuple(w.shape[2:])  # conv weight: (out, in / groups, *kernel)
        a, b = factorization(w.shape[0], config.decompose_factor)
        c, d = factorization(w.shape[1], config.decompose_factor)
        self.whole_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.whole_w2 = r >= max(b, d) / 2
        self.cp = effective_conv(config, base) and not self.whole_w2
        if self.whole_w1:
            self.lokr_w1 = new_param(a, c, like=w)
        else:
            self.lokr_w1_a = new_param(a, r, like=w)
            self.lokr_w1_b = new_param(r, c, like=w)
        if self.whole_w2:
            self.lokr_w2 = new_param(b, d, *kernel, like=w)
        elif self.cp:
            k1, k2 = (kernel + (1,))[:2]  # a Conv1d kernel k is a (k, 1) core
            self.lokr_t2 = new_param(r, r, k1, k2, like=w)
            self.lokr_w2_a = new_param(r, b, like=w)
            self.lokr_w2_b = new_param(r, d, like=w)
        else:
            self.lokr_w2_a = new_param(b, r, like=w)
            self.lokr_w2_b = new_param(r, d * math.prod(kernel), like=w)
        self._init(config.init_weights)

    def _init(self, init_weights: bool | str) -> None:
        """He init, in PEFT's order; True zeroes W1 (or W1a), "lycoris" zeroes W2 (or W2b)."""
        zero_w1, zero_w2 = init_weights is True, init_weights == "lycoris"

        def fill(t: torch.Tensor, zero: bool) -> None:
            if zero:
                nn.init.zeros_(t)
            else:
                kaiming_(t)

        with torch.no_grad():
            if self.whole_w1:
                fill(self.lokr_w1, zero_w1)
            else:
                fill(self.lokr_w1_a, zero_w1)
                kaiming_(self.lokr_w1_b)
            if self.whole_w2:
                fill(self.lokr_w2, zero_w2)
            else:
                kaiming_(self.lokr_w2_a)
                fill(self.lokr_w2_b, zero_w2)
            if self.cp:
                kaiming_(self.lokr_t2)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """On a Linear, kron(W1, W2) x as W1 X W2^T with X the input folded to (c, d): two small products
        instead of building the (out, in) update and one large product. Convs and rank dropout (which drops
        rows of the dense update) take the dense path."""
        if not isinstance(self.base, nn.Linear) or (self.training and self.rank_dropout > 0):
            return super().forward(x, base_out)
        if self.training and self.module_dropout > 0 and not bool(torch.rand(1) > self.module_dropout):
            return base_out
        w1, w2 = self.factors()
        (a, c), (b, d) = w1.shape, w2.shape
        lead, n = x.shape[:-1], x.shape[:-1].numel()
        h = x if x.dtype == w1.dtype else x.to(w1.dtype)
        h = (h.reshape(n * c, d) @ w2.T).reshape(n, c, b).transpose(1, 2).reshape(n * b, c)  # X W2^T, as (n b, c)
        h = (h @ (w1.T * self.scaling)).reshape(n, b, a).transpose(1, 2).reshape(*lead, a * b)  # W1 (X W2^T)
        return base_out + h.to(base_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 and W2 (W2 with its kernel dims on a conv), rebuilt from their low-rank or CP forms."""
        w1 = self.lokr_w1 if self.whole_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.whole_w2:
            w2 = self.lokr_w2
        elif self.cp:
            w2 = cp_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def dense_update(self) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.ndim == 4:  # the kernel rides on W2: W1 becomes (a, c, 1, 1)
            w1 = w1[:, :, None, None]
        # A whole Conv1d W2 is (b, d, k) against a 2-d W1: torch.kron then prepends a unit dim to W1, and the
        # reshape below gives the layout PEFT's files hold for that case.
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(self.base.weight.shape)


register("lokr", LoKrConfig, LoKrDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     quantized_base=False, peft_compatible=True))
