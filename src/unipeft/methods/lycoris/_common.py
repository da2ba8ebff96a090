"""What LoHa and LoKr share: rank / alpha (with per-module patterns), rank and module dropout, the shape
of the weight they rebuild, and the output-side delta that applies that weight to the site's input.

Both methods rebuild a dense update dW with the base weight's shape from a few small factors and add
`F.linear(x, dW)` (or the base's convolution of x with dW, bias-free) to the base output, so a merge is
exactly `W + dW`. scaling = alpha / r, as in PEFT's LyCORIS layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import Rule, fraction, is_int, positive_int, ruled
from ...core.targets import pattern_key

# The base layers PEFT's LoHa / LoKr adapt (GPT-2's transposed Conv1D and Conv3d are not among them).
LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flag(default: bool) -> Any:
    """A field that must be exactly True or False (1 / "yes" would silently mean something else)."""
    return ruled(default, Rule(lambda v: isinstance(v, bool), "True or False"))


def finite_number(default: float) -> Any:
    """A finite real number (bools refused)."""
    return ruled(default, Rule(_is_number, "a finite number"))


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields common to LoHa and LoKr (PEFT's LycorisConfig plus the fields both of its subclasses have)."""

    r: int = positive_int(8)
    alpha: float = finite_number(8)
    rank_dropout: float = fraction(0.0, "0 <= rank_dropout < 1")
    module_dropout: float = fraction(0.0, "0 <= module_dropout < 1")
    use_effective_conv2d: bool = flag(False)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        for name, expected, ok in (("rank_pattern", "a positive integer rank",
                                    lambda v: is_int(v) and v > 0),
                                   ("alpha_pattern", "a finite number", _is_number)):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ConfigError(f"{owner}.{name}: expected a dict of module name or regex -> value, got {patterns!r}")
            for key, value in patterns.items():
                if not isinstance(key, str) or not ok(value):
                    raise ConfigError(f"{owner}.{name}[{key!r}]: expected a string key and {expected}, got {value!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{owner}.layers_pattern: only used together with layers_to_transform, which is "
                              f"not set (got layers_pattern={self.layers_pattern!r})")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the module at `path` (rank_pattern / alpha_pattern win)."""
        rk, ak = pattern_key(self.rank_pattern, path), pattern_key(self.alpha_pattern, path)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.alpha)


def kaiming_(t: torch.Tensor) -> None:
    """The uniform He init PEFT gives the non-zero factors (nn.Linear's default)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def kernel_of(base: nn.Module) -> tuple[int, ...]:
    """The kernel size of a conv base, () for a Linear."""
    return tuple(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else ()


def effective_conv(config: LycorisConfig, base: nn.Module) -> bool:
    """Whether the kernel gets its own CP core: asked for, and the kernel is not 1 (x 1) (a pointwise conv is
    a matrix product, so the flat form is used as for a Linear)."""
    kernel = kernel_of(base)
    return bool(config.use_effective_conv2d) and bool(kernel) and any(k != 1 for k in kernel)


def cp_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """(out, in, k1, k2) from a (r, r, k1, k2) core and (r, out) / (r, in) factors (a Tucker/CP product)."""
    return torch.einsum("i j k l, i p, j q -> p q k l", core, out_factor, in_factor)


def new_param(*shape: int, like: torch.Tensor) -> nn.Parameter:
    """An uninitialised float32 parameter on the device of `like` (the base weight)."""
    return nn.Parameter(torch.empty(*shape, device=like.device))


class LycorisDelta(Delta):
    """An output-side delta `base_out + conv_or_linear(x, dense_update())`, mergeable as `dense_update()`.

    Subclasses create their factors and define `dense_update()` (the scaled update, shaped as the base weight)
    and `rank_drop_scale` (whether the rank-dropout mask is renormalised to mean one).
    In training, module dropout skips the whole update with probability `module_dropout` per call, and
    rank dropout zeroes each output row of the update with probability `rank_dropout` (both as PEFT does).
    """

    commutes = True  # additive and computed from its own factors only: stacking equals merging both
    rank_drop_scale = True

    def __init__(self, base: nn.Module, config: LycorisConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not isinstance(base, LAYERS):
            names = ", ".join(t.__name__ for t in LAYERS)
            raise TargetError(f"{type(config).__name__}: '{path}' is a {type(base).__name__}; supported: {names}")
        self.r, self.alpha = config.rank_and_alpha(path)
        self.scaling = self.alpha / self.r
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        # init_weights=False draws every factor at random: the fresh adapter changes the model.
        self.identity_at_init = config.init_weights is not False

    def dense_update(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        """The scaled update, shaped like the base weight."""
        raise NotImplementedError

    def _drop_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Rank dropout: keep each output row with probability 1 - p (renormalised when `rank_drop_scale`)."""
        keep = (torch.rand(w.shape[0]) > self.rank_dropout).to(device=w.device, dtype=w.dtype)
        if self.rank_drop_scale:
            # A mask that dropped every row stays all zeros (rather than 0/0).
            keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
        return w * keep.view(-1, *[1] * (w.ndim - 1))

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x through the base layer's operation with weight `w` and no bias."""
        if isinstance(self.base, nn.Linear):
            return F.linear(x, w)
        return self.base._conv_forward(x, w, None)  # stride, padding (and its mode), dilation, groups

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and not bool(torch.rand(1) > self.module_dropout):
            return base_out
        w = self.dense_update()
        if self.training and self.rank_dropout > 0:
            w = self._drop_rows(w)
        h = self.apply_weight(x if x.dtype == w.dtype else x.to(w.dtype), w)
        return base_out + h.to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": self.dense_update()}
