"""The SVD-form delta P Λ Q shared by AdaLoRA and IncreLoRA, with in-place rank changes.

out = base(x) + (dropout(x) @ (A * E).T @ B.T) * scale, where A = Q (r x in), E = Λ (r x 1, the
singular values), B = P (out x r) and `scale` = scaling / (ranknum + 1e-5) as PEFT's SVDLinear
computes it. On disk: `lora_A`, `lora_B`, `lora_E` (PEFT's AdaLoRA names); `ranknum` is not saved.

The config supplies `rank_of(path)`, `scale_of(path)`, `dropout` and `random_init` (PEFT's
init_lora_weights=False: all factors ~ N(0, 1); otherwise E = 0, A, B ~ N(0, 0.02)).
"""
from __future__ import annotations

import torch
from torch import nn

from ...core import layers
from ...core.delta import Delta
from ...core.errors import TargetError
from ...core.resize import resize_param

LAYERS = layers.MATRIX_LAYERS  # nn.Linear and GPT-2's transposed Conv1D


class SvdDelta(Delta):
    """P Λ Q on a matrix layer; `set_rank` keeps chosen triplets and adds new ones (E = 0: no output change)."""

    commutes = True

    def __init__(self, base: nn.Module, config, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not isinstance(base, LAYERS) or layers.is_quantized(base):
            raise TargetError(f"{type(config).__name__}: '{path}' of type {type(base).__name__} is not supported "
                              f"(nn.Linear and Conv1D are)")
        geo = layers.geometry(base)
        r = config.rank_of(path)
        self.scale = config.scale_of(path)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, geo.in_features))
        self.lora_E = nn.Parameter(torch.empty(r, 1))
        self.lora_B = nn.Parameter(torch.empty(geo.out_features, r))
        with torch.no_grad():
            if config.random_init:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    p.normal_()
            else:
                self.lora_E.zero_()
                self.lora_A.normal_(0.0, 0.02)
                self.lora_B.normal_(0.0, 0.02)

    @property
    def r(self) -> int:
        """The current number of triplets."""
        return self.lora_E.shape[0]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a = self.lora_A * self.lora_E
        h = self.lora_dropout(x.to(a.dtype))
        return base_out + ((h @ a.T @ self.lora_B.T) * self.scale).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        dense = (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale
        return {"weight": layers.to_param_layout(self.base, dense)}

    def orth_penalty(self) -> torch.Tensor:
        """||A A^T - I||_F + ||B^T B - I||_F (PEFT's orthogonal regulariser, per module, not averaged)."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(self.r, dtype=a.dtype, device=a.device)
        return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)

    def set_rank(self, keep: list[int] | torch.Tensor, new_rank: int, optimizer=None,
                 generator: torch.Generator | None = None) -> None:
        """Keep triplets `keep` (in order), add new_rank - len(keep) new ones (E = 0, A, B ~ N(0, 0.02)),
        resizing the optimizer's state in place (see core/resize.py)."""
        extra = new_rank - len(keep)
        fill_a = fill_b = None
        if extra > 0:
            fill_a = torch.randn(extra, self.lora_A.shape[1], generator=generator) * 0.02
            fill_b = torch.randn(self.lora_B.shape[0], extra, generator=generator) * 0.02
        resize_param(self, "lora_A", 0, keep, new_rank, optimizer, fill_a)
        resize_param(self, "lora_E", 0, keep, new_rank, optimizer)
        resize_param(self, "lora_B", 1, keep, new_rank, optimizer, fill_b)
