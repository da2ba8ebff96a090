"""What the methods of this package share: field rules PEFT's configs need (pattern dicts, mixed
bool/string choices, plain integers), per-module values from pattern dicts, errors naming the field
and the module, and an output delta given by one dense (out, in) update matrix."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import Rule, is_int, ruled
from ...core.targets import pattern_key


def positive_int_dict() -> Any:
    """A dict {module name or regex: positive integer} (PEFT's *_pattern fields), empty by default."""
    def ok(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(k, str) and is_int(x) and x > 0 for k, x in v.items())
    return dataclasses.field(default_factory=dict, metadata={"rule": Rule(ok, "a dict {module name or regex: "
                                                                                "positive integer}")})


def one_of(default: Any, options: tuple) -> Any:
    """One of `options`, where True/False are told apart from 1/0 (PEFT's bool-or-string init fields)."""
    def ok(v: Any) -> bool:
        return any(v is o if isinstance(o, bool) else (isinstance(v, str) and v == o) for o in options)
    return ruled(default, Rule(ok, f"one of {list(options)}"))


def integer(default: int | None, optional: bool = False) -> Any:
    """Any integer (a seed); bools are refused."""
    return ruled(default, Rule(is_int, "an integer", optional))


def finite_number(default: float) -> Any:
    """Any finite int or float (a scale)."""
    return ruled(default, Rule(lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v),
                               "a finite number"))


def per_module(config, name: str, pattern_name: str, path: str) -> tuple[int, str]:
    """(value, label) of field `name` at module `path`: the first key of the pattern dict `pattern_name`
    selecting `path` (a suffix on a '.' boundary, or a regex) wins; the label names where it came from."""
    patterns = getattr(config, pattern_name)
    key = pattern_key(patterns, path)
    owner = type(config).__name__
    if key is None:
        return getattr(config, name), f"{owner}.{name}"
    return patterns[key], f"{owner}.{pattern_name}[{key!r}]"


def module_error(label: str, path: str, base: nn.Module, expected: str, got: Any) -> ConfigError:
    """A ConfigError for a value that does not fit one module's (out, in) weight."""
    geo = layers.geometry(base)
    return ConfigError(f"{label}: expected {expected} for module '{path}' (weight {geo.out_features}x"
                       f"{geo.in_features}: out x in), got {got!r}")


class DenseDelta(Delta):
    """An output delta whose update is one dense (out, in) matrix `matrix()`: out = base(x) + x @ dW^T.

    Merging adds dW in the layer's storage layout (transposed for GPT-2's Conv1D)."""

    commutes = True  # additive in weight space
    fuses_base = True

    def __init__(self, base: nn.Module, config, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        self.in_features, self.out_features = geo.in_features, geo.out_features

    def matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The update dW as a dense (out, in) matrix."""
        raise NotImplementedError

    def composed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + dW for the base weight W (out, in): the weight `fused_call` multiplies by."""
        return weight + self.matrix().to(weight.dtype)

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (W + dW)^T + b as one product: a matmul fewer than base(x) + x dW^T, forward and backward
        (the input gradient). Only this class's own forward is fused: a subclass with another forward
        (dropout on the input, a second term) keeps the plain path unless it fuses itself."""
        base = self.base
        if type(self).forward is not DenseDelta.forward or not layers.callable_as_linear(base, x):
            return None
        return F.linear(x, self.composed_weight(base.weight), base.bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw = self.matrix()
        return base_out + F.linear(x.to(dw.dtype), dw).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.matrix())}
