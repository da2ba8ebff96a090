"""C3A: a block-circulant weight update applied by FFT.

The (out, in) update is a grid of (out/b) x (in/b) circulant blocks of size b = `block_size`, each
given by one length-b kernel row, so `c3a_kernel` has shape (out/b, in/b, b) and block (m, n) is
M[t, j] = kernel[m, n, (j - t) mod b]. Applying a block is a circular cross-correlation, computed in
the frequency domain: y_m = irfft(sum_n rfft(x_n) * conj(rfft(kernel[m, n]))). As in PEFT the update is
divided by in_features: out = base(x) + x @ dW^T with dW = blocks / in. b must divide both widths of
every target. PEFT's default init is Xavier-uniform (not the identity); init_weights=True starts at
zeros, "gaussian" and "kaiming_uniform" are PEFT's other draws. Kernels are kept in float32, since
half-precision FFTs are not generally available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import AdapterConfig
from ...core.fields import choice, positive_int
from ...core.registry import Capabilities, register
from ._common import DenseDelta, module_error, one_of, per_module, positive_int_dict

INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(AdapterConfig):
    """C3A (PEFT's C3AConfig): block-circulant updates of block_size (per module: block_size_pattern)."""

    peft_class = "C3AConfig"
    peft_type = "C3A"
    not_in_peft = ("exclude_modules",)

    block_size: int = positive_int(256)
    bias: str = choice("none", ["none"])
    block_size_pattern: dict[str, int] = positive_int_dict()
    init_weights: bool | str = one_of("xavier_uniform", INITS)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Block size 1 divides every width (the toy models' widths share no larger divisor)."""
        return {"block_size": 1}


def circulant_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The dense (m*b, n*b) matrix of block-circulant kernels (m, n, b): block (m, n)[t, j] = kernel[m, n, (j-t) % b]."""
    m, n, b = kernel.shape
    pos = torch.arange(b, device=kernel.device)
    shift = (pos[None, :] - pos[:, None]) % b
    return kernel[:, :, shift].permute(0, 2, 1, 3).reshape(m * b, n * b)


def block_circulant_apply(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x @ circulant_matrix(kernel)^T over the last dim of `x`, by real FFTs of length b."""
    m, n, b = kernel.shape
    xf = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b), dim=-1)
    kf = torch.fft.rfft(kernel, dim=-1).conj()
    yf = torch.einsum("...nf,mnf->...mf", xf, kf)
    return torch.fft.irfft(yf, n=b, dim=-1).reshape(*x.shape[:-1], m * b)


def init_kernel(kernel: torch.Tensor, how: bool | str, in_features: int, out_features: int) -> None:
    """Fill the kernel in place as PEFT does for `init_weights=how` (True: leave it at zero)."""
    if how is True:
        return
    if how == "gaussian":
        nn.init.normal_(kernel)
        return
    if how == "kaiming_uniform":
        bound = math.sqrt(1.0 / in_features)
    else:  # "xavier_uniform" and False
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
    nn.init.uniform_(kernel, -bound, bound)


class C3ADelta(DenseDelta):
    """The kernels `c3a_kernel` (out/b, in/b, b), float32."""

    identity_at_init = False  # PEFT's default init is Xavier-uniform

    def __init__(self, base: nn.Module, config: C3AConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        b, label = per_module(config, "block_size", "block_size_pattern", path)
        if self.in_features % b or self.out_features % b:
            raise module_error(label, path, base, "a divisor of both in_features and out_features", b)
        kernel = torch.zeros(self.out_features // b, self.in_features // b, b, dtype=torch.float32)
        with torch.no_grad():
            init_kernel(kernel, config.init_weights, self.in_features, self.out_features)
        self.c3a_kernel = nn.Parameter(kernel)
        self.identity_at_init = config.init_weights is True

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = block_circulant_apply(x.to(torch.float32), self.c3a_kernel.to(torch.float32)) / self.in_features
        return base_out + h.to(base_out.dtype)

    def matrix(self) -> torch.Tensor:
        return circulant_matrix(self.c3a_kernel.to(torch.float32)) / self.in_features


register("c3a", C3AConfig, C3ADelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
