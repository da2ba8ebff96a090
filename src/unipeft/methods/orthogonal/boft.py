"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"):
the rotation is a product of m butterfly factors, each a block-diagonal orthogonal matrix seen
through a fixed butterfly permutation, and every output gets a learned scale.

    M = P_{m-1} B_{m-1} P_{m-1}^T ... P_0 B_0 P_0^T,    W' = diag(s) W M^T

B_i has `boft_block_num` blocks of `boft_block_size` (give one of the two; their product is the
rotated width: in_features, or in * kh * kw for Conv2d), each the exact Cayley map of the skew part
of a trained square matrix (PEFT's `boft_R`, shape (m, blocks, size, size)); `boft_s` is the output
scale ((out, 1) for Linear, (1, out) for Conv2d, as PEFT stores it). P_0 is the identity; the later
permutations interleave blocks so that m factors mix 2^(m-1) blocks. boft_R = 0 and s = 1 at init:
the identity. `boft_dropout` turns int(p * blocks) random blocks of one random factor into the
identity while training, as PEFT does.

PEFT builds m > 1 factors only when its CUDA block-diagonal kernel compiles (it falls back to m = 1
otherwise, e.g. on CPU); this delta always honours `boft_n_butterfly_factor`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import fraction, positive_int
from ...core.registry import Capabilities, register
from ._common import OrthogonalDelta, SizedBlocks, cayley, flag, rotated_width, split

_SIZES = ("boft_block_num", "boft_block_size")


@dataclass
class BOFTConfig(SizedBlocks, AdapterConfig):
    """BOFT: the base runs with diag(s) W M^T, M a product of boft_n_butterfly_factor butterfly rotations."""

    peft_class = "BOFTConfig"
    peft_type = "BOFT"
    sizes = _SIZES
    peft_inert = {"fan_in_fan_out": False, "bias": "none"}

    boft_block_size: int | None = positive_int(4, optional=True)
    boft_block_num: int | None = positive_int(None, optional=True)
    boft_n_butterfly_factor: int = positive_int(1)
    boft_dropout: float = fraction(0.0, "0 <= boft_dropout < 1")
    init_weights: bool = flag(True)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Blocks of 2 divide every width of the toy models."""
        return {"boft_block_size": 2}


def _check_butterfly(width: int, num: int, size: int, factor: int, path: str) -> None:
    """The factorisation PEFT accepts: m factors need 2^(m-1) | blocks and even blocks/sizes."""
    extra = factor - 1
    if extra == 0:
        return
    if num % (2 ** extra) or size % 2 or num % 2:
        raise ConfigError(f"BOFTConfig.boft_n_butterfly_factor: {factor} factors need an even block size and a "
                          f"block count divisible by 2^{extra}; '{path}' ({width} rotated features) has "
                          f"{num} blocks of {size}")


def butterfly_perm(n: int, blocks: int, half: int, extra: int) -> torch.Tensor:
    """PEFT's block butterfly permutation of range(n): within each group of n // blocks entries, the
    chunks of `half` entries are reordered evens first, then odds (identity when extra == 0)."""
    if extra == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ConfigError(f"BOFTConfig.boft_n_butterfly_factor: too many factors for {n} rotated features")
    group = n // blocks
    chunks = group // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    inner = torch.cat([torch.arange(c * half, c * half + half) for c in order])
    return torch.cat([start + inner for start in range(0, n, group)])


class BOFTDelta(OrthogonalDelta):
    """BOFT on a Linear or a Conv2d with groups 1 (see the module docstring)."""

    def __init__(self, base: nn.Module, config: BOFTConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        width = rotated_width(base, "BOFTConfig", path)
        num, size = split(width, config.boft_block_num, config.boft_block_size, "BOFTConfig", _SIZES, path)
        factor = config.boft_n_butterfly_factor
        _check_butterfly(width, num, size, factor, path)
        self.block_num, self.block_size, self.p = num, size, config.boft_dropout
        self.conv = layers.geometry(base).kind == "conv"
        out = layers.geometry(base).out_features
        self.boft_R = nn.Parameter(torch.zeros(factor, num, size, size))
        self.boft_s = nn.Parameter(torch.ones((1, out) if self.conv else (out, 1)))
        self.identity_at_init = config.init_weights  # random factors and scales change the output at init
        if not config.init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = [butterfly_perm(width, num // 2 ** i, size // 2, factor - 1) for i in range(factor)]
        self.register_buffer("perms", torch.stack(perms), persistent=False)

    def factor_blocks(self, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks of every factor, (m, blocks, size, size); `dropout`: the training
        forward's block dropout."""
        m, d, h, _ = self.boft_R.shape
        a = self.boft_R.reshape(m * d, h, h)
        blocks = cayley(0.5 * (a - a.transpose(1, 2))).reshape(m, d, h, h)
        if dropout and self.p > 0:
            blocks = self._drop(blocks)
        return blocks

    def _drop(self, blocks: torch.Tensor) -> torch.Tensor:
        """int(p * blocks) random blocks of one random factor become the identity."""
        m, d, h, _ = blocks.shape
        pick = torch.randint(0, m, (1,)).item()
        n_drop = int(self.p * d)
        mask = torch.cat([torch.ones(n_drop, device=blocks.device), torch.zeros(d - n_drop, device=blocks.device)])
        full = torch.zeros(m, d, 1, 1, device=blocks.device, dtype=blocks.dtype)
        full[pick] = mask[torch.randperm(d)].view(d, 1, 1).to(blocks.dtype)
        return (1 - full) * blocks + full * torch.eye(h, device=blocks.device, dtype=blocks.dtype)

    def rotation(self, dropout: bool = False) -> torch.Tensor:
        """M = P_{m-1} B_{m-1} P_{m-1}^T ... P_0 B_0 P_0^T, (width, width)."""
        out = None
        for blocks, perm in zip(self.factor_blocks(dropout), self.perms):
            factor = torch.block_diag(*blocks)[perm][:, perm]  # P B P^T with P[i, perm[i]] = 1
            out = factor if out is None else factor @ out
        return out

    def scale(self) -> torch.Tensor:
        """The output scale as an (out, 1) column."""
        return self.boft_s.transpose(0, 1) if self.conv else self.boft_s

    def transform(self, rows: torch.Tensor, dropout: bool) -> torch.Tensor:
        m = self.rotation(dropout)
        return torch.mm(m, rows.to(m.dtype).t()).t() * self.scale()


register("boft", BOFTConfig, BOFTDelta, Capabilities(mergeable=True, mixed_batch=True,
                                                     layer_types=(nn.Linear, nn.Conv2d), peft_compatible=True))
