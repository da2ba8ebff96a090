"""LoRA initialisations as registered functions: `init_lora_weights` names one of them.

An init gets an `InitContext` (the dense (out, in) base weight from core/layers.py, the rank,
the path, and, when it declared `needs`, the calibration statistics core collected for this
target) and returns an `InitResult`: A (r x in) and B (out x r), and optionally a new value of
the base weight (e.g. the residual an SVD-based init leaves) that core writes and restores
exactly on unload/delete. The next inits (PiSSA, OLoRA, EVA, CorDA, LoRA-GA, ...) are one
`register_init` call each.

A *prefix* init (`register_init("pissa_niter_", fn, prefix=True)`) names a family with an integer
argument: "pissa_niter_16" resolves to `fn(ctx, 16)`, and the full name is what PEFT stores. An init
may name the LoRA variant (variants.py) its deltas use (`variant="svfit"`), for methods whose trained
parametrisation is not plain (A, B).
"""
from __future__ import annotations

import math
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...core.errors import ConfigError


@dataclass
class InitContext:
    """What an init may read."""

    weight: torch.Tensor  # the base weight, dense (out, in), detached
    r: int
    a_shape: tuple[int, ...]  # lora_A's weight shape (r x in, or the conv kernel r x in x k...)
    b_shape: tuple[int, ...]
    path: str
    config: Any
    calibration: Any = None  # core.calibration.TargetStats when the init declared `needs`

    def stats(self):
        """The calibration statistics of this target; ConfigError when none were collected."""
        if self.calibration is None:
            raise ConfigError(f"LoraConfig.init={self.config.init!r} needs calibration data: pass "
                              f"calibration=[batch, ...] to up.adapt / add_adapter")
        return self.calibration


@dataclass
class InitResult:
    """A (r x in), B (out x r) and an optional new dense (out, in) base weight."""

    a: torch.Tensor
    b: torch.Tensor
    base_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraInit:
    """A registered init: its function and what it needs ("activations", "gradients" or None)."""

    name: str
    fn: Callable[[InitContext], InitResult]
    needs: str | None = None
    peft_value: Any = None  # how PEFT writes it in init_lora_weights (default: the name)
    variant: str | None = None  # the variant (variants.py) its deltas use; None: the config's own
    # A data-aware init whose result lives only in A and B (EVA): a saved adapter loads without data.
    data_only_in_factors: bool = False


INITS: dict[str, LoraInit] = {}
# Prefix families: "pissa_niter_" -> init whose fn takes (ctx, int); resolved by get_init.
PREFIX_INITS: dict[str, LoraInit] = {}


def register_init(name: str, fn: Callable[..., InitResult], needs: str | None = None,
                  peft_value: Any = None, *, prefix: bool = False, variant: str | None = None,
                  data_only_in_factors: bool = False) -> LoraInit:
    """Make `init_lora_weights=name` available (with `prefix`: every `name<int>`, fn(ctx, int))."""
    if needs not in (None, "activations", "gradients"):
        raise ValueError(f"init '{name}': needs must be None, 'activations' or 'gradients', got {needs!r}")
    init = LoraInit(name, fn, needs, name if peft_value is None else peft_value, variant, data_only_in_factors)
    (PREFIX_INITS if prefix else INITS)[name] = init
    return init


def known_inits() -> list[str]:
    """Every accepted init name, prefix families written as 'name<int>'."""
    return sorted(INITS) + sorted(f"{p}<int>" for p in PREFIX_INITS)


def get_init(name: str) -> LoraInit:
    """The registered init (a prefix family bound to its integer); ConfigError listing the known ones otherwise."""
    if isinstance(name, str) and name in INITS:
        return INITS[name]
    if isinstance(name, str):
        for prefix, init in PREFIX_INITS.items():
            arg = name[len(prefix):]
            if name.startswith(prefix) and arg.isdigit() and int(arg) > 0:
                return replace(init, name=name, fn=functools.partial(init.fn, arg=int(arg)), peft_value=name)
    raise ConfigError(f"LoraConfig.init: expected one of {known_inits()}, got {name!r}")


def _kaiming(ctx: InitContext) -> InitResult:
    a = torch.empty(ctx.a_shape)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
    return InitResult(a, torch.zeros(ctx.b_shape))


def _gaussian(ctx: InitContext) -> InitResult:
    a = torch.empty(ctx.a_shape)
    nn.init.normal_(a, std=1 / ctx.r)
    return InitResult(a, torch.zeros(ctx.b_shape))


register_init("kaiming", _kaiming, peft_value=True)
register_init("gaussian", _gaussian)
