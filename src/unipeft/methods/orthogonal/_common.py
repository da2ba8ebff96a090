"""Pieces the orthogonal methods share: the matrix each one rotates, the Cayley map, block dropout.

Every method here sees its base weight as a 2-D matrix with one row per output (Linear: (out, in);
Conv2d: (out, in * kh * kw), flattened in PyTorch's (channel, kh, kw) order as PEFT does;
Embedding: (num_embeddings, dim)) and returns the new matrix (`OrthogonalDelta.transform`). The
base then runs with that weight, so the unmerged forward and the merged weight are one formula.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...core import layers
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import Rule, ruled


def flag(default: bool) -> Any:
    """A dataclass field that must be True or False."""
    return ruled(default, Rule(lambda v: isinstance(v, bool), "True or False"))


def zero_to_none(value: Any) -> Any:
    """PEFT writes 0 for "not set" in its pairs of exclusive sizes; we keep None."""
    return None if value == 0 and not isinstance(value, bool) else value


def none_to_zero(value: Any) -> Any:
    """Inverse of `zero_to_none`, for the file PEFT reads."""
    return 0 if value is None else value


def rotated_width(base: nn.Module, owner: str, path: str, refuse_dilation: bool = False) -> int:
    """The length of the vectors the rotation acts on (columns of the 2-D weight view)."""
    geo = layers.geometry(base)
    if geo.kind == "embedding":
        return base.embedding_dim
    if geo.kind == "conv":
        if base.groups > 1:
            raise TargetError(f"{owner}: '{path}' is a Conv2d with groups={base.groups}; only groups=1 is supported")
        if refuse_dilation and max(base.dilation) > 1:
            raise TargetError(f"{owner}: '{path}' is a Conv2d with dilation={tuple(base.dilation)}; "
                              f"only dilation 1 is supported")
        return base.weight[0].numel()
    return geo.in_features


def divisors(n: int) -> list[int]:
    """The divisors of n greater than 1 (for error messages)."""
    return [d for d in range(2, n + 1) if n % d == 0]


def split(width: int, count: int | None, size: int | None, owner: str, names: tuple[str, str],
          path: str) -> tuple[int, int]:
    """(number of blocks, block size) with count * size == width; ConfigError naming the field otherwise."""
    count_name, size_name = names
    if size is not None:
        if width % size:
            raise ConfigError(f"{owner}.{size_name}: expected a divisor of the {width} rotated features of "
                              f"'{path}' (e.g. one of {divisors(width)[:8]}), got {size}")
        return width // size, size
    if width % count:
        raise ConfigError(f"{owner}.{count_name}: expected a divisor of the {width} rotated features of "
                          f"'{path}' (e.g. one of {divisors(width)[:8]}), got {count}")
    return count, width // count


def exactly_one(config: Any, names: tuple[str, str]) -> None:
    """ConfigError unless exactly one of the two exclusive size fields is set (PEFT: the other is 0)."""
    a, b = (getattr(config, n) for n in names)
    if (a is None) == (b is None):
        raise ConfigError(f"{type(config).__name__}.{names[0]} / {names[1]}: expected exactly one of them to be set "
                          f"(the other None, 0 in PEFT's file: {names[0]} x {names[1]} = rotated features), "
                          f"got {names[0]}={a!r}, {names[1]}={b!r}")


def skew(vec: torch.Tensor, size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(b, n) upper-triangle entries -> (b, size, size) skew-symmetric matrices."""
    mat = vec.new_zeros(vec.shape[0], size, size)
    mat[:, rows, cols] = vec
    return mat - mat.transpose(-2, -1)


def cayley(skew_mats: torch.Tensor) -> torch.Tensor:
    """The exact Cayley map (I - S)(I + S)^-1 of a batch of skew-symmetric matrices: orthogonal."""
    eye = torch.eye(skew_mats.shape[-1], device=skew_mats.device, dtype=skew_mats.dtype).expand_as(skew_mats)
    return torch.linalg.solve(eye + skew_mats, eye - skew_mats, left=False)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: int(p * D) random blocks of (D, k, k) become the identity (training only)."""
    d, k, _ = blocks.shape
    n_drop = int(p * d)
    mask = torch.cat([torch.ones(n_drop, device=blocks.device), torch.zeros(d - n_drop, device=blocks.device)])
    mask = mask[torch.randperm(d)].view(d, 1, 1).to(blocks.dtype)
    eye = torch.eye(k, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a 2-D matrix with one row per output (channel or embedding)."""
    return weight.reshape(weight.shape[0], -1)


class OrthogonalDelta(Delta):
    """A weight-side delta W -> transform(W) on the 2-D view of the base weight.

    The forward runs the base with the transformed weight; merging adds transform(W) - W, read from
    the current base weight (hence `weight_dependent`: core keeps what it added to undo it exactly).
    Stacked on one site, adapters apply in order to the weight, which is also the merge order.
    """

    kind = "weight"
    weight_dependent = True

    def transform(self, rows: torch.Tensor, dropout: bool) -> torch.Tensor:  # pragma: no cover - overridden
        """The new 2-D weight for the 2-D weight `rows` (differentiable in the adapter's parameters);
        `dropout`: apply the method's training-time block dropout (the forward in training mode only,
        never a merge)."""
        raise NotImplementedError

    def _new_weight(self, weight: torch.Tensor, dropout: bool) -> torch.Tensor:
        # Contiguous: a transposed view would send the base's matmul down another kernel (other rounding).
        return self.transform(as_rows(weight), dropout).reshape(weight.shape).to(weight.dtype).contiguous()

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": self._new_weight(params["weight"], self.training)}

    def delta_weight(self) -> dict[str, torch.Tensor]:
        weight = self.base.weight.detach()
        return {"weight": self._new_weight(weight, False) - weight}


class SizedBlocks:
    """Config mixin: exactly one of the two block-size fields `sizes` is set; PEFT writes the unset one as 0."""

    sizes: ClassVar[tuple[str, str]] = ()

    def validate(self) -> None:
        super().validate()
        exactly_one(self, self.sizes)

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        return none_to_zero(value) if name in cls.sizes else value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        return zero_to_none(value) if name in cls.sizes else value
