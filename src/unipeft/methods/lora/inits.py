"""LoRA initialisations as registered functions: `init_lora_weights` names one of them.

An init gets an `InitContext` (the dense (out, in) base weight from core/layers.py, the rank,
the path, and, when it declared `needs`, the calibration statistics core collected for this
target) and returns an `InitResult`: A (r x in) and B (out x r), and optionally a new value of
the base weight (e.g. the residual an SVD-based init leaves) that core writes and restores
exactly on unload/delete. The next inits (PiSSA, OLoRA, EVA, CorDA, LoRA-GA, ...) are one
`register_init` call each.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


INITS: dict[str, LoraInit] = {}


def register_init(name: str, fn: Callable[[InitContext], InitResult], needs: str | None = None,
                  peft_value: Any = None) -> LoraInit:
    """Make `init_lora_weights=name` available."""
    if needs not in (None, "activations", "gradients"):
        raise ValueError(f"init '{name}': needs must be None, 'activations' or 'gradients', got {needs!r}")
    INITS[name] = LoraInit(name, fn, needs, name if peft_value is None else peft_value)
    return INITS[name]


def get_init(name: str) -> LoraInit:
    """The registered init; ConfigError listing the known ones otherwise."""
    if name not in INITS:
        raise ConfigError(f"LoraConfig.init: expected one of {sorted(INITS)}, got {name!r}")
    return INITS[name]


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
