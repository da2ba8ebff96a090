"""LoRA variants as strategies: how a linear LoRA delta turns (A, B) into its output and its merged weight.

A variant is stateless (one instance serves every delta); what it learns lives on the delta
under PEFT's names (DoRA's `lora_magnitude_vector`). `LoraConfig.variant` names the one to use;
adding a variant is a class and one `register_variant` call, not a flag in four methods.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers


class Variant:
    """Plain LoRA: out = base_out + scaling * B A dropout(x)."""

    name: ClassVar[str] = "lora"
    weight_dependent: ClassVar[bool] = False  # delta_weight reads the base weight
    groupable: ClassVar[bool] = True  # mixed batches may batch it with the same variant
    fusable: ClassVar[bool] = True  # fused.py's base + shrink + expand function computes it
    commutes: ClassVar[bool] = True  # additive: stacked deltas of this variant commute (see Delta.commutes)
    identity_at_init: ClassVar[bool] = True  # the adapted model starts as the base (KaSA truncates the base)

    def setup(self, delta) -> None:
        """Create the variant's own parameters on `delta` (after A and B exist)."""

    def forward(self, delta, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The site's new output."""
        a, b = delta.lora_A.weight, delta.lora_B.weight
        h = delta.lora_dropout(x if x.dtype == a.dtype else x.to(a.dtype))
        if h.dtype == base_out.dtype:
            # One fused op for "B-projection, scale, add": addmm(base, hA, B^T, alpha=scaling).
            ha, s = F.linear(h, a).reshape(-1, delta.r), delta.scaling
            if isinstance(s, torch.Tensor):  # hot-swappable (hotswap.py): scale the r-wide activations
                ha, s = ha * s, 1
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), ha, b.t(), alpha=s)
            return out.view(base_out.shape)
        return base_out + (F.linear(F.linear(h, a), b) * delta.scaling).to(base_out.dtype)

    def delta_weight(self, delta) -> torch.Tensor:
        """The dense (out, in) change of the weight that merging adds."""
        return delta.lora_weight() * delta.scaling


class DoRA(Variant):
    """DoRA (Liu et al. 2024): W' = m * (W + s BA) / ||W + s BA||_row, m trained (init: the row norms)."""

    name = "dora"
    weight_dependent = True
    groupable = False
    fusable = False
    commutes = False  # the magnitude renormalises whatever else the site adds

    def setup(self, delta) -> None:
        with torch.no_grad():
            norm = self.weight_norm(delta)
        delta.lora_magnitude_vector = nn.Parameter(norm.clone())

    @staticmethod
    def weight_norm(delta) -> torch.Tensor:
        """Row norms of W + s BA without forming BA (out x in):
        ||w_i + s (BA)_i||^2 = ||w_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 <B_i, (B A A^T)_i>.
        W A^T comes from the base layer itself applied to the r rows of A (so a quantized base is
        never dequantized per call); ||w_i||^2 is kept until the base weight changes, the whole
        norm until A, B or the base weight change (every call in eval)."""
        a, b, base = delta.lora_A.weight, delta.lora_B.weight, delta.base
        if torch.compiler.is_compiling():
            # Traced: no cache (version counters cannot be traced); the graph computes the norm.
            with torch.no_grad():
                return DoRA._norm(delta, layers.dense_weight(base).to(a.dtype).pow(2).sum(1))
        weight = base.weight
        key = (id(a), a._version, id(b), b._version, id(weight), weight._version)
        cached = delta.__dict__.get("_dora_norm")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            rows = delta.__dict__.get("_dora_rows")
            if rows is None or rows[0] != key[4:]:
                w = layers.dense_weight(base).to(a.dtype)
                rows = (key[4:], w.pow(2).sum(1))
                object.__setattr__(delta, "_dora_rows", rows)
            norm = DoRA._norm(delta, rows[1])
        object.__setattr__(delta, "_dora_norm", (key, norm))
        return norm

    @staticmethod
    def _norm(delta, row_sq: torch.Tensor) -> torch.Tensor:
        """The row norms from ||w_i||^2 (`row_sq`), uncached (see `weight_norm`)."""
        a, b, base = delta.lora_A.weight, delta.lora_B.weight, delta.base
        weight = base.weight
        wa = base(a.to(weight.dtype if weight.is_floating_point() else a.dtype)).to(a.dtype)
        if base.bias is not None:
            wa = wa - base.bias.to(a.dtype)
        s = delta.scaling
        cross = (b * wa.t()).sum(1)
        own = ((b @ (a @ a.t())) * b).sum(1)
        return (row_sq + 2 * s * cross + s * s * own).clamp_min(0).sqrt()

    def forward(self, delta, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = delta.lora_A.weight, delta.lora_B.weight
        h = delta.lora_dropout(x if x.dtype == a.dtype else x.to(a.dtype))
        lora_out = F.linear(F.linear(h, a), b)
        # The norm is detached (DoRA paper, sec. 4.3), as PEFT does.
        norm = self.weight_norm(delta)
        scale = delta.lora_magnitude_vector / norm
        if isinstance(delta.lora_dropout, nn.Identity) or not delta.training:
            plain = base_out if delta.base.bias is None else base_out - delta.base.bias
        else:
            plain = F.linear(h, layers.dense_weight(delta.base).to(h.dtype))
        return base_out + ((scale - 1) * plain + scale * lora_out * delta.scaling).to(base_out.dtype)

    def delta_weight(self, delta) -> torch.Tensor:
        lora_w = delta.lora_weight() * delta.scaling
        w = layers.dense_weight(delta.base).to(lora_w.dtype)
        scale = delta.lora_magnitude_vector / self.weight_norm(delta)
        return scale[:, None] * (w + lora_w) - w


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make `LoraConfig.variant == variant.name` available."""
    VARIANTS[variant.name] = variant
    return variant


register_variant(Variant())
register_variant(DoRA())
