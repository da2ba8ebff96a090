"""Uni-LoRA: every LoRA factor entry of every site is one entry of a single trained vector theta_d,
picked by a fixed seeded index and scaled by 1/sqrt(how often that entry is used).

Flatten the factors of all sites in model order (each site's A (r, in), then its B (out, r)): D
entries in all. The index assigns each of them to one of the `theta_d_length` entries of theta_d,
balanced (each entry used floor(D/d) or ceil(D/d) times: the leftover entries drawn without
repeats, then the whole assignment shuffled, by numpy's default_rng at `proj_seed`). A =
theta_d[idx_A] * s_A, B = theta_d[idx_B] * s_B, delta_W = B A. theta_d (saved as
`base_model.unilora_theta_d`) is uniform in +-init_theta_d_bound, so the update is not zero at
init. With `save_indices` each site's indices and scales are stored too (PEFT's layout) and must
equal what the seed assigns; otherwise they are regenerated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.errors import AdapterLoadError
from ...core.fields import choice, fraction, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import LAYERS, FactorDelta, transposed

_STORED = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


@dataclass
class UniLoraConfig(AdapterConfig):
    """Uni-LoRA (PEFT's UniLoraConfig): rank r factors of every site drawn from one vector of theta_d_length."""

    peft_class = "UniLoraConfig"
    peft_type = "UNILORA"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(4)
    proj_seed: int = 42
    theta_d_length: int = positive_int(256)
    unilora_dropout: float = fraction(0.0, "0 <= unilora_dropout < 1")
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_theta_d_bound: float = positive_number(0.02)
    init_weights: bool = True
    save_indices: bool = False

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "UniLoraBank":
        return UniLoraBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "theta_d_length": 64}


def balanced_index(count: int, length: int, seed: int) -> torch.Tensor:
    """`count` entries of [0, length), each used floor or ceil(count / length) times, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class UniLoraBank(Bank):
    """The trained vector theta_d and every site's (index, scale) of A and B, assigned once per adapter."""

    def __init__(self, config: UniLoraConfig, targets) -> None:
        super().__init__()
        if config.init_weights:
            theta = torch.empty(config.theta_d_length).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
        else:
            theta = torch.randn(config.theta_d_length)
        self.unilora_theta_d = nn.Parameter(theta)
        self.seed_value = config.proj_seed
        r = config.r
        shapes = []
        for path, module in targets:
            geo = layers.geometry(module)
            shapes.append((path, (r, geo.in_features), (geo.out_features, r), module.weight.dtype))
        index = balanced_index(sum(a[0] * a[1] + b[0] * b[1] for _, a, b, _ in shapes),
                               config.theta_d_length, config.proj_seed)
        counts = torch.bincount(index, minlength=config.theta_d_length)
        inv_sqrt = torch.zeros(config.theta_d_length)
        inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
        # Plain attribute: per-site tensors live (and are saved) in the deltas.
        self.assigned: dict[str, tuple[torch.Tensor, ...]] = {}
        start = 0
        for path, a_shape, b_shape, dtype in shapes:
            idx_a = index[start:start + a_shape[0] * a_shape[1]].view(a_shape)
            start += idx_a.numel()
            idx_b = index[start:start + b_shape[0] * b_shape[1]].view(b_shape)
            start += idx_b.numel()
            self.assigned[path] = (idx_a, idx_b, inv_sqrt[idx_a].to(dtype), inv_sqrt[idx_b].to(dtype))

    def saved_key(self, key: str) -> str:
        return f"base_model.{key}"


class UniLoraDelta(FactorDelta):
    """The site's index and scale buffers (saved only with save_indices); its factors read theta_d."""

    identity_at_init = False  # theta_d is random from the start, as in the paper and PEFT

    def __init__(self, base: nn.Module, config: UniLoraConfig, path: str, bank: UniLoraBank | None = None) -> None:
        super().__init__(base, config, path, bank, config.unilora_dropout)
        for name, value in zip(_STORED, bank.assigned[path]):
            self.register_buffer(name, value.clone(), persistent=config.save_indices)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.bank.unilora_theta_d
        a = theta[self.unilora_indices_A] * self.unilora_scales_A.to(theta.dtype)
        b = theta[self.unilora_indices_B] * self.unilora_scales_B.to(theta.dtype)
        return a, b

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in _STORED:
            if name in tensors and not torch.equal(tensors[name].to(getattr(self, name).dtype), getattr(self, name)):
                raise AdapterLoadError(f"{self.path}: the stored '{name}' differs from what UniLoraConfig.proj_seed="
                                       f"{self.bank.seed_value} assigns; the file was written with another seed (set "
                                       f"UniLoraConfig.proj_seed to the one it was trained with)")
        super().import_state(tensors)


register("unilora", UniLoraConfig, UniLoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                              peft_compatible=True))
