"""RoAd (Liao et al. 2024, "2D Rotary Adaptation"): every output of a linear layer is rotated and scaled
in 2-D pairs, y = R (W x + b), with R block-diagonal in 2x2 scaled rotations.

The outputs are split into groups of `group_size`; inside a group, feature i is paired with feature
i + group_size/2 (as rotary embeddings pair them). Per feature, R takes two coefficients
c = alpha cos(theta) and s = alpha sin(theta) and maps h -> h * c + rot(h) * s, where rot(h) swaps each
pair with a sign, (h1, h2) -> (-h2, h1). The variants decide how many angles/scales are trained
(`road_theta`, `road_alpha`, both 1-D as PEFT stores them):

    road_1  out/2 of each: one angle and scale per pair, shared by its two features
    road_2  out of each:   one per feature
    road_4  2 * out:       separate angles and scales for the cos and the sin coefficient

theta = 0 and alpha = 1 at init (`init_weights=True`): c = 1, s = 0, the identity bit for bit. The
delta works on the site's output (kind "output"), elementwise and per row, so a mixed batch gathers
each row's coefficients and rotates the whole batch at once (`forward_grouped`). Merging writes
R W and R b (computed with the same elementwise formula on the columns of W), read from the current
weight, hence `weight_dependent`.

Without `target_modules`, every Linear with an even output width is adapted (PEFT would pick its
per-architecture list instead; the folders it saves name their targets, so loading is unaffected).
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
from ...core.fields import Rule, choice, is_int, ruled
from ...core.registry import Capabilities, register
from ._common import divisors, flag

VARIANTS = ("road_1", "road_2", "road_4")
_PARAMS_PER_OUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(AdapterConfig):
    """RoAd: y = R (W x + b), R pairwise 2-D rotations with scales over groups of `group_size` outputs."""

    peft_class = "RoadConfig"
    peft_type = "ROAD"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")

    variant: str = choice("road_1", VARIANTS)
    group_size: int = ruled(64, Rule(lambda v: is_int(v) and v > 0 and v % 2 == 0, "a positive even integer"))
    init_weights: bool = flag(True)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Groups of 2 (one pair) divide every even output width."""
        return {"group_size": 2}


def coefficients(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), each (out,): the cos and sin coefficient of every output feature."""
    if variant == "road_1":  # one (theta, alpha) per pair: repeat it for both halves of each group
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta = theta.reshape(-1, 2, group_size)  # road_4: per group, the cos half then the sin half
    alpha = alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def rotate_half(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """(h1, h2) -> (-h2, h1) within each group of the last axis (h1: its first half, h2: its second)."""
    g = h.unflatten(-1, (h.shape[-1] // group_size, 2, group_size // 2))
    return torch.stack((-g[..., 1, :], g[..., 0, :]), dim=-2).flatten(-3)


def apply_road(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """R h for vectors along the last axis of h (c, s broadcast against h)."""
    return h * c + rotate_half(h, group_size) * s


class RoadDelta(Delta):
    """RoAd on a Linear: the site's output is rotated (see the module docstring)."""

    weight_dependent = True

    def __init__(self, base: nn.Module, config: RoadConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        out = layers.geometry(base).out_features
        gs = config.group_size
        if out % 2:
            raise ConfigError(f"RoadConfig.target_modules: '{path}' has an odd number of outputs ({out}), which "
                              f"RoAd cannot pair for its 2-D rotations; exclude it (exclude_modules)")
        if out % gs:
            raise ConfigError(f"RoadConfig.group_size: expected an even divisor of the {out} output features of "
                              f"'{path}' (e.g. one of {[d for d in divisors(out) if d % 2 == 0][:8]}), got {gs}")
        self.variant, self.group_size = config.variant, gs
        size = int(out * _PARAMS_PER_OUT[config.variant])
        self.road_theta = nn.Parameter(torch.zeros(size))
        self.road_alpha = nn.Parameter(torch.ones(size))
        self.identity_at_init = config.init_weights
        if not config.init_weights:  # PEFT's test init: random angles around 0 and scales around 1
            nn.init.normal_(self.road_theta, mean=0.0, std=0.5)
            nn.init.normal_(self.road_alpha, mean=1.0, std=0.5)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, s), each (out,)."""
        return coefficients(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def rotate(self, h: torch.Tensor) -> torch.Tensor:
        """R h along the last axis, in the adapter's dtype."""
        c, s = self.coefficients()
        return apply_road(h.to(c.dtype), c, s, self.group_size)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.rotate(base_out).to(base_out.dtype)

    @classmethod
    def forward_grouped(cls, deltas, x, base_out, row_group):
        """Every row rotated by its own adapter's coefficients (identity rows for no adapter) in one
        elementwise pass; None (per-group fallback) when the groups differ in group size or dtype."""
        live = [d for d in deltas if d is not None]
        gs, dtype = live[0].group_size, live[0].road_theta.dtype
        if any(d.group_size != gs or d.road_theta.dtype != dtype for d in live):
            return None
        pairs = [d.coefficients() if d is not None else None for d in deltas]
        ref = pairs[deltas.index(live[0])][0]
        c = torch.stack([torch.ones_like(ref) if p is None else p[0] for p in pairs]).index_select(0, row_group)
        s = torch.stack([torch.zeros_like(ref) if p is None else p[1] for p in pairs]).index_select(0, row_group)
        shape = (base_out.shape[0],) + (1,) * (base_out.dim() - 2) + (base_out.shape[-1],)
        out = apply_road(base_out.to(dtype), c.view(shape), s.view(shape), gs)
        return out.to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        base = self.base
        w = base.weight
        out = {"weight": self.rotate(w.t()).t().to(w.dtype).contiguous() - w}  # R W: rotate each column of W
        if base.bias is not None:
            out["bias"] = self.rotate(base.bias).to(base.bias.dtype) - base.bias
        return out


def pairable_linear(path: str, module: nn.Module) -> bool:
    """The default targets (no target_modules): Linear layers with an even number of outputs."""
    return isinstance(module, nn.Linear) and module.out_features % 2 == 0


register("road", RoadConfig, RoadDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,),
                                                     peft_compatible=True), default_targets=pairable_linear)
