"""SuperTuning: train a sparse support of a weight's own entries, chosen by magnitude, plus an optional LoRA.

For a Linear weight W (out, in), K = int(out*in * (1 - sparsity)) entries train. The support is the top-K
of |W| (select_top=True, "Super") or the bottom-K (select_top=False), taken once when the adapter is
created: no calibration data is needed. The values add onto those entries: dW = scatter(values), and
out = base(x) + x @ dW^T. Setting `r` adds a LoRA pair on top ("Supra"): dW += (lora_alpha / r) * B @ A,
with lora_alpha defaulting to 2r and dropout on the LoRA input only.

Keys are PEFT's: `supertuning_values` (K,), `supertuning_indices` (K,) int32 flat positions into the
(out, in) weight, and in Supra mode `supertuning_lora_A.weight` (r, in), `supertuning_lora_B.weight` (out, r).
With save_precomputed_indices=False the indices are not written; loading recomputes them from the base
weight's magnitudes, which gives the same support only on the same base weights. PEFT's init
(init_weights=True) is the identity: values and B start at zero (A is Kaiming-uniform); init_weights=False
draws the values from a standard normal and B Kaiming-uniform. The update is additive and does not read
the base weight after creation, so stacked adapters commute and a mixed batch (one adapter per row) equals
one forward per adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import AdapterLoadError, ConfigError
from ...core.fields import Rule, fraction, positive_int, ruled
from ...core.registry import Capabilities, register
from ._common import DenseDelta, module_error


def _optional_number() -> Any:
    return ruled(None, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                            "a finite number (or None: 2 * r)", optional=True))


@dataclass
class SupertuningConfig(AdapterConfig):
    """SuperTuning (PEFT's SupertuningConfig): a magnitude-chosen sparse support of each Linear weight trains,
    (1 - sparsity) of its entries; `r` adds a LoRA pair (Supra)."""

    peft_class = "SupertuningConfig"
    peft_type = "SUPERTUNING"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")

    sparsity: float = fraction(0.99, "0 <= sparsity < 1")
    select_top: bool = True
    r: int | None = positive_int(None, optional=True)
    lora_alpha: float | None = _optional_number()
    lora_dropout: float = fraction(0.0)
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def validate(self) -> None:
        """lora_alpha only scales a LoRA part, which needs r."""
        super().validate()
        if self.r is None and self.lora_alpha is not None:
            raise ConfigError(f"SupertuningConfig.lora_alpha: expected None when r is None (the LoRA part of Supra "
                              f"mode needs a rank r), got {self.lora_alpha!r}")

    def lora_scaling(self) -> float:
        """lora_alpha / r (lora_alpha defaults to 2r); 0 without a LoRA part."""
        if self.r is None:
            return 0.0
        alpha = 2 * self.r if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.r

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """A quarter of each toy weight trains, with a rank-2 LoRA part (Supra mode)."""
        return {"sparsity": 0.75, "r": 2}


def magnitude_support(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """(k,) int32 flat positions of the k largest (or smallest) |weight| entries, in topk's order."""
    return torch.topk(weight.detach().abs().flatten(), k=k, largest=largest).indices.to(torch.int32)


class SupertuningDelta(DenseDelta):
    """Sparse values `supertuning_values` at `supertuning_indices`, plus the optional LoRA pair."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Module, config: SupertuningConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        size = self.out_features * self.in_features
        k = int(size * (1 - config.sparsity))
        if k < 1:
            raise module_error("SupertuningConfig.sparsity", path, base,
                               f"a sparsity that leaves at least one of the {size} entries trainable", config.sparsity)
        # Persistent or not as the config says: without stored indices, loading re-selects them from the base.
        support = magnitude_support(layers.dense_weight(base), k, config.select_top)
        self.register_buffer("supertuning_indices", support, persistent=config.save_precomputed_indices)
        self.supertuning_values = nn.Parameter(torch.zeros(k) if config.init_weights else torch.randn(k))
        self.r = config.r or 0
        self.scaling = config.lora_scaling()
        if self.r:
            self.supertuning_lora_A = nn.Linear(self.in_features, self.r, bias=False)
            self.supertuning_lora_B = nn.Linear(self.r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(self.supertuning_lora_A.weight, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.supertuning_lora_B.weight)
            else:
                nn.init.kaiming_uniform_(self.supertuning_lora_B.weight, a=math.sqrt(5))
            self.supertuning_lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 \
                else nn.Identity()
        self.identity_at_init = bool(config.init_weights)

    def _scatter_into(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (out, in) with the values added at the support (repeated positions add up)."""
        values = self.supertuning_values
        idx = self.supertuning_indices.to(device=values.device, dtype=torch.int64)
        return weight.reshape(-1).scatter_add(0, idx, values.to(weight.dtype)).view(weight.shape)

    def sparse_matrix(self) -> torch.Tensor:
        """The sparse part of dW as a dense (out, in) matrix."""
        v = self.supertuning_values
        return self._scatter_into(torch.zeros(self.out_features, self.in_features, dtype=v.dtype, device=v.device))

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sparse part scattered into W, one product (PEFT's way), then the LoRA pair on top."""
        base = self.base
        if not layers.callable_as_linear(base, x):
            return None
        return self._lora_on(x, F.linear(x, self._scatter_into(base.weight), base.bias))

    def _lora_on(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.r:
            return out
        a = self.supertuning_lora_A
        h = self.supertuning_lora_dropout(x.to(a.weight.dtype))
        return out + (self.scaling * self.supertuning_lora_B(a(h))).to(out.dtype)

    def matrix(self) -> torch.Tensor:
        dw = self.sparse_matrix()
        if self.r:
            dw = dw + self.scaling * (self.supertuning_lora_B.weight @ self.supertuning_lora_A.weight).to(dw.dtype)
        return dw

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse_matrix()
        return self._lora_on(x, base_out + F.linear(x.to(sparse.dtype), sparse).to(base_out.dtype))

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse stored indices that are not whole numbers inside the weight before anything is written."""
        idx = tensors.get("supertuning_indices")
        if idx is not None:
            if idx.is_floating_point() and not torch.equal(idx, idx.round()):
                raise AdapterLoadError(f"'{self.path}': supertuning_indices must hold whole numbers")
            size = self.out_features * self.in_features
            if idx.numel() and (idx.min() < 0 or idx.max() >= size):
                raise AdapterLoadError(f"'{self.path}': supertuning_indices point outside the {self.out_features}x"
                                       f"{self.in_features} weight (flat positions 0..{size - 1})")
        super().import_state(tensors)


register("supertuning", SupertuningConfig, SupertuningDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
