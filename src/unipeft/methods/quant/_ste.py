"""Straight-through estimators shared by the quantization-aware methods."""
from __future__ import annotations

import torch


class RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class SignScaleSTE(torch.autograd.Function):
    """where(w >= 0, alpha, -alpha) forward (sign(0) := +1), identity backward to `w` (alpha gets none)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, alpha, -alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None
