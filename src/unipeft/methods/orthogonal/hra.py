"""HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation"): the weight is multiplied by a chain of r Householder reflections.

    H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T)   (u_i = column i of hra_u, normalised),   W' = W H

`hra_u` is (in_features, r), or (in * kh * kw, r) for Conv2d, as PEFT stores it. With `apply_GS`
the columns are first made orthonormal (Gram-Schmidt) and H = I - 2 U U^T. The default init
(`init_weights=True`, even r) repeats each of r/2 Kaiming-uniform columns twice, so consecutive
reflections cancel: the identity up to float rounding (about 1e-7, hence `identity_at_init` is
not declared). With odd r that symmetric init is impossible; like PEFT, all columns are then
random (with a warning), and the adapter is not the identity at init. Nor is it with `apply_GS`:
Gram-Schmidt turns each duplicated column into normalised rounding noise (in PEFT as well).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.fields import positive_int
from ...core.registry import Capabilities, register
from ._common import OrthogonalDelta, flag, rotated_width


@dataclass
class HRAConfig(AdapterConfig):
    """HRA: the base runs with W H, H a product of r Householder reflections (or I - 2UU^T with apply_GS)."""

    peft_class = "HRAConfig"
    peft_type = "HRA"
    peft_inert = {"bias": "none"}

    r: int = positive_int(8)
    apply_GS: bool = flag(False)
    init_weights: bool = flag(True)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Two reflections (one cancelling pair at init)."""
        return {"r": 2}


class HRADelta(OrthogonalDelta):
    """HRA on a Linear or a Conv2d with groups 1 (see the module docstring)."""

    identity_at_init = False  # the identity up to ~1e-7 (paired reflections), not bit for bit

    def __init__(self, base: nn.Module, config: HRAConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        width = rotated_width(base, "HRAConfig", path)
        self.r, self.apply_gs = config.r, config.apply_GS
        if config.init_weights and config.r % 2 == 0:
            half = torch.zeros(width, config.r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        else:
            if config.init_weights:
                warnings.warn(f"HRAConfig.r={config.r} is odd: the symmetric (identity) init needs an even r, "
                              f"so '{path}' starts from random reflections", stacklevel=2)
            u = torch.empty(width, config.r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)

    def reflection(self) -> torch.Tensor:
        """H, (width, width): the product of the reflections in column order (or I - 2UU^T with GS)."""
        u = self.hra_u
        eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
        if self.apply_gs:
            basis = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
            for i in range(1, self.r):
                v = u[:, i].view(-1, 1)
                for b in basis:
                    v = v - (b.t() @ v) * b
                basis.append((v / v.norm()).view(-1, 1))
            q = torch.cat(basis, dim=1)
            return eye - 2 * q @ q.t()
        u = u / u.norm(dim=0)
        out = eye
        for i in range(self.r):
            ui = u[:, i].view(-1, 1)
            out = out - 2 * out @ ui @ ui.t()
        return out

    def transform(self, rows: torch.Tensor, dropout: bool) -> torch.Tensor:
        h = self.reflection()  # HRA has no dropout
        return torch.mm(rows.to(h.dtype), h)


register("hra", HRAConfig, HRADelta, Capabilities(mergeable=True, mixed_batch=True,
                                                  layer_types=(nn.Linear, nn.Conv2d), peft_compatible=True))
