"""SHiRA: a sparse high-rank update of r*(in+out) weight entries on a fixed mask.

A target's (out, in) weight gets K = r*(in+out) trained entries (as many parameters as rank-r LoRA,
with no rank limit). The mask (PEFT's "random" mask_type) is the first K positions of a random
permutation of the out*in positions, from a fresh CPU generator seeded with `random_seed` (left at the
generator's default seed when None, so it is reproducible either way). The file stores the mask as PEFT
does: `shira_indices`, an int32 (2, K) tensor of (row, column) pairs in row-major order, next to the
values `shira_weight` (K,). Loading takes the indices from the file, whatever seed made them.
out = base(x) + x @ dW^T; repeated positions in a loaded mask add up, as in PEFT's sparse tensor.
PEFT's init (init_weights=True) is zeros: the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.errors import AdapterLoadError
from ...core.fields import choice, positive_int
from ...core.registry import Capabilities, register
from ._common import DenseDelta, integer, module_error


@dataclass
class ShiraConfig(AdapterConfig):
    """SHiRA (PEFT's ShiraConfig): r*(in+out) trained entries per target on a seeded random mask."""

    peft_class = "ShiraConfig"
    peft_type = "SHIRA"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")

    r: int = positive_int(32)
    mask_type: str = choice("random", ["random"])
    random_seed: int | None = integer(None, optional=True)
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """SHiRA adapts nn.Linear only, whose weight is stored (out, in): PEFT records False."""
        return {"fan_in_fan_out": False}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """r=1 fits every layer with two or more inputs and outputs."""
        return {"r": 1, "random_seed": 3}


def random_mask(seed: int | None, out_features: int, in_features: int, k: int) -> torch.Tensor:
    """(2, k) int32 (row, column) of the first k positions of a seeded permutation, in row-major order."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))
    flat = torch.randperm(out_features * in_features, generator=generator)[:k].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraDelta(DenseDelta):
    """The values `shira_weight` (K,) at the stored positions `shira_indices` (2, K)."""

    def __init__(self, base: nn.Module, config: ShiraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        k = config.r * (self.in_features + self.out_features)
        if k > self.in_features * self.out_features:
            raise module_error("ShiraConfig.r", path, base, f"r*(in+out) <= in*out = "
                               f"{self.in_features * self.out_features} entries (r*(in+out) = {k})", config.r)
        self.register_buffer("shira_indices", random_mask(config.random_seed, self.out_features,
                                                          self.in_features, k))
        self.shira_weight = nn.Parameter(torch.zeros(k) if config.init_weights else torch.randn(k))
        self.identity_at_init = bool(config.init_weights)

    def _add_to(self, weight: torch.Tensor) -> torch.Tensor:
        values = self.shira_weight
        rows, cols = self.shira_indices.to(device=values.device, dtype=torch.int64)
        return weight.index_put((rows, cols), values.to(weight.dtype), accumulate=True)

    def matrix(self) -> torch.Tensor:
        w = self.shira_weight
        return self._add_to(torch.zeros(self.out_features, self.in_features, dtype=w.dtype, device=w.device))

    def composed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W with the K values added at their positions (no dense dW in between)."""
        return self._add_to(weight)

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse stored indices outside the weight before anything is written."""
        idx = tensors.get("shira_indices")
        if idx is not None:
            if idx.is_floating_point() and not torch.equal(idx, idx.round()):
                raise AdapterLoadError(f"'{self.path}': shira_indices must hold whole numbers")
            idx = idx.to(torch.int64)
            if idx.numel() and (idx.min() < 0 or idx[0].max() >= self.out_features
                                or idx[1].max() >= self.in_features):
                raise AdapterLoadError(f"'{self.path}': shira_indices point outside the {self.out_features}x"
                                       f"{self.in_features} weight")
        super().import_state(tensors)


register("shira", ShiraConfig, ShiraDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
