"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; PEFT's 0.14+
parametrisation): the inputs of a layer are rotated by a learned block-diagonal orthogonal matrix.

Each of the r blocks (size k = in / r) is the Cayley map of a skew-symmetric matrix Q whose k(k-1)/2
upper-triangle entries are trained (PEFT's `oft_R.weight`, shape (r, k(k-1)/2), or (1, ...) with
`block_share`). The map is exact, (I - Q)(I + Q)^-1, or its Neumann series I + 2Q + 2Q^2 + ... with
`num_cayley_neumann_terms` terms (`use_cayley_neumann`, PEFT's default: cheaper, orthogonal only up
to the truncation). Rotating the input x -> x R equals running the base with W R^T, which is what
this delta does (and what merging writes). Embeddings rotate their outputs: E -> E R
(`oft_embedding_R.weight`). COFT (`coft`) keeps every block within `eps` of zero by projecting the
parameters in place before each use, as PEFT does. Q = 0 at init (`init_weights=True`): the identity.

Unlike PEFT (which silently moves a block size that does not divide the layer's width), a size that
does not fit is a ConfigError naming the field. `module_dropout` turns int(p * r) random blocks into
the identity while training (the multiplicative dropout PEFT documents; PEFT 0.21 builds but does
not apply it). Conv2d weights are rotated over their flattened (in, kh, kw) axis as PEFT merges them;
for kernels larger than 1x1 PEFT's own unmerged forward differs from its merge, and this delta
follows the merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import fraction, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import OrthogonalDelta, SizedBlocks, cayley, drop_blocks, flag, rotated_width, skew, split

_SIZES = ("r", "oft_block_size")


@dataclass
class OFTConfig(SizedBlocks, AdapterConfig):
    """OFT: the base runs with W R^T, R block-diagonal orthogonal (r blocks of oft_block_size; give one)."""

    peft_class = "OFTConfig"
    peft_type = "OFT"
    sizes = _SIZES
    peft_inert = {"fan_in_fan_out": False, "bias": "none"}

    r: int | None = positive_int(None, optional=True)
    oft_block_size: int | None = positive_int(32, optional=True)
    module_dropout: float = fraction(0.0, "0 <= module_dropout < 1")
    init_weights: bool = flag(True)
    coft: bool = flag(False)
    eps: float = positive_number(6e-5)
    block_share: bool = flag(False)
    use_cayley_neumann: bool = flag(True)
    num_cayley_neumann_terms: int = positive_int(5)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Blocks of 2 divide every width of the toy models."""
        return {"oft_block_size": 2}


class _Vector(nn.Module):
    """Holds the skew-symmetric parameters as `.weight`, so the key is PEFT's `oft_R.weight`."""

    def __init__(self, rows: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, n))


class OFTDelta(OrthogonalDelta):
    """OFT on a Linear, Conv2d (groups 1, dilation 1) or Embedding (see the module docstring)."""

    fuses_base = True

    def __init__(self, base: nn.Module, config: OFTConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        width = rotated_width(base, "OFTConfig", path, refuse_dilation=True)
        self.blocks, self.block_size = split(width, config.r, config.oft_block_size, "OFTConfig", _SIZES, path)
        self.embedding = layers.geometry(base).kind == "embedding"
        self.out_rows = base.weight.shape[0]
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.dropout = config.module_dropout
        k = self.block_size
        self.param_name = "oft_embedding_R" if self.embedding else "oft_R"
        self.add_module(self.param_name, _Vector(1 if config.block_share else self.blocks, k * (k - 1) // 2))
        self.identity_at_init = config.init_weights  # random blocks (init_weights=False) rotate from the start
        if not config.init_weights:
            nn.init.normal_(self.vector, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(k, k, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def vector(self) -> nn.Parameter:
        """The trained upper-triangle entries, (blocks or 1, k(k-1)/2)."""
        return getattr(self, self.param_name).weight

    def _project(self) -> None:
        """COFT: scale each block's skew matrix back onto the ball of radius eps / sqrt(#blocks), in place."""
        with torch.no_grad():
            q = skew(self.vector, self.block_size, self.rows, self.cols)
            eps = self.eps / torch.sqrt(torch.tensor(float(q.shape[0])))
            norm = torch.norm(q, dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            self.vector.copy_(q[:, self.rows, self.cols])

    def _neumann(self, q: torch.Tensor) -> torch.Tensor:
        """PEFT's truncated series for the Cayley map: I + 2Q + 2Q^2 + ... + Q^(n-1) (n terms)."""
        k, n = self.block_size, self.terms
        eye = torch.eye(k, device=q.device, dtype=q.dtype)
        if n <= 1:
            return eye.repeat(q.shape[0], 1, 1)
        out = torch.add(eye, q, alpha=2.0)  # one fused op per term (x + 2y), as PEFT's in-place add_
        if n > 2:
            power = torch.bmm(q, q)
            out = out.add(power, alpha=2.0)
            for _ in range(3, n - 1):
                power = torch.bmm(power, q)
                out = out.add(power, alpha=2.0)
            out = out + torch.bmm(power, q)
        return out

    def rotation_blocks(self, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks, (blocks, k, k) (one block repeated with block_share); `dropout`: turn
        int(module_dropout * blocks) random ones into the identity (the training forward)."""
        if self.coft:
            self._project()
        q = skew(self.vector, self.block_size, self.rows, self.cols)
        blocks = self._neumann(q) if self.neumann else cayley(q)
        if dropout and self.dropout > 0 and blocks.shape[0] > 1:
            blocks = drop_blocks(blocks, self.dropout)
        return blocks.expand(self.blocks, -1, -1) if self.block_share else blocks

    def rotation(self) -> torch.Tensor:
        """The full block-diagonal matrix R, (width, width), as merged (no dropout)."""
        return torch.block_diag(*self.rotation_blocks())

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """A Linear's output with the input rotated, base(x R) (PEFT's way), when that is cheaper than
        the base with W R^T: always while training (the weight path forms an (out, in) gradient of
        W R^T, the input path only token-by-block products), and when there are fewer tokens than outputs."""
        base = self.base
        if self.embedding or not layers.callable_as_linear(base, x) or self.vector.dtype != x.dtype:
            return None
        if not (torch.is_grad_enabled() and self.vector.requires_grad) and x.numel() // x.shape[-1] >= self.out_rows:
            return None
        r = self.rotation_blocks(self.training)
        rotated = torch.einsum("...bi,bij->...bj", x.reshape(*x.shape[:-1], self.blocks, self.block_size), r)
        return F.linear(rotated.reshape(x.shape), base.weight, base.bias)

    def transform(self, rows: torch.Tensor, dropout: bool) -> torch.Tensor:
        r = self.rotation_blocks(dropout)
        w = rows.to(r.dtype).reshape(rows.shape[0], self.blocks, self.block_size)
        if self.embedding:  # E R: each embedding row is rotated like an input vector
            out = torch.einsum("nbk,bkc->nbc", w, r)
        else:  # W R^T: inputs rotated by R before the base layer
            out = torch.einsum("nbj,bij->nbi", w, r)
        return out.reshape(rows.shape)


register("oft", OFTConfig, OFTDelta, Capabilities(mergeable=True, mixed_batch=True,
                                                  layer_types=(nn.Linear, nn.Conv2d, nn.Embedding),
                                                  peft_compatible=True))
