"""What the low-rank structured methods share: PEFT's Kaiming init, the transposed-weight flag, field rules
and errors that name the module whose shape does not fit."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...core import layers
from ...core.errors import ConfigError
from ...core.fields import Rule, ruled

MATRIX = layers.MATRIX_LAYERS  # nn.Linear and GPT-2's Conv1D
LINEAR = (nn.Linear,)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """PEFT's default draw for a trained factor: Kaiming-uniform with a=sqrt(5) (nn.Linear's own init)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def up_init_(t: torch.Tensor, init_weights: bool) -> torch.Tensor:
    """The up projection's init: zero, so a fresh adapter is the identity; Kaiming with init_weights=False."""
    with torch.no_grad():
        return nn.init.zeros_(t) if init_weights else kaiming_(t)


def transposed(targets) -> bool:
    """PEFT records GPT-2's transposed Conv1D weights as fan_in_fan_out=True."""
    return any(layers.is_transposed(m) for _, m in targets)


def flag(default: bool):
    """A field that must be a real bool (PEFT's switches)."""
    return ruled(default, Rule(lambda v: isinstance(v, bool), "True or False"))


def only_none_bias(default: str = "none"):
    """PEFT's `bias` switch: only 'none' is modelled (train biases with BitFitConfig)."""
    return ruled(default, Rule(lambda v: v == "none", "'none' (train biases with BitFitConfig)"))


def shape_error(owner: str, field: str, path: str, what: str) -> ConfigError:
    """A ConfigError for a target whose shape the config's `field` does not fit."""
    return ConfigError(f"{owner}.{field}: module '{path}' {what}")
