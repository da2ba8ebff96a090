"""PSOFT ("Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation"): an r x r orthogonal
matrix R is trained between two frozen factors of the principal subspace of W.

    y = W x + b + s * B (R - I) A x,     s = psoft_alpha / r

A (r, in) and B (out, r) come from the top-r singular triplets of W, taken once when the adapter is
built and never trained or saved (they are rebuilt from the base weight on load, as PEFT does):
`ab_svd_init="psoft_init"` gives A = V_r^T (orthonormal rows) and B = U_r S_r / s; "pissa_init" splits
sqrt(S_r / s) into both. `psoft_svd="lowrank"` uses a randomized SVD seeded with `random_seed` (on a
forked RNG, so the global one is untouched). R is the Cayley map (I + Q)(I - Q)^-1 of a skew-symmetric
Q whose upper triangle is trained (PEFT's `psoft_R.weight`, r(r-1)/2 entries), or its truncated
Neumann series with `use_cayley_neumann` (Q first scaled onto the Frobenius ball of radius
`cayley_neumann_eps` when set); with `psoft_orth=False` R is a free (r, r) matrix. Optional
magnitudes scale R's rows (`psoft_mag_b`, `psoft_R.vector_b`) and columns (`psoft_mag_a`,
`psoft_R.vector_a`). Q = 0 (or R = I) and magnitudes of one at init: R = I exactly, the identity.

An additive output delta, so it merges as s B (R - I) A, stacks with others in any order and mixes
per row in a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import choice, fraction, non_negative_int, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import flag


@dataclass
class PsoftConfig(AdapterConfig):
    """PSOFT: y = W x + s B (R - I) A x with A, B frozen SVD factors of W and R an r x r (orthogonal) matrix."""

    peft_class = "PsoftConfig"
    peft_type = "PSOFT"
    peft_inert = {"fan_in_fan_out": False}  # Linear layers only, for which PEFT resets it to False

    r: int = positive_int(32)
    psoft_alpha: float = positive_number(32)
    psoft_dropout: float = fraction(0.0, "0 <= psoft_dropout < 1")
    ab_svd_init: str = choice("psoft_init", ("psoft_init", "pissa_init"))
    psoft_svd: str = choice("full", ("full", "lowrank"))
    psoft_svd_lowrank_niter: int = non_negative_int(10)
    random_seed: int = non_negative_int(0)
    psoft_orth: bool = flag(True)
    psoft_mag_b: bool = flag(True)
    psoft_mag_a: bool = flag(True)
    use_cayley_neumann: bool = flag(False)
    num_cayley_neumann_terms: int = positive_int(5)
    cayley_neumann_eps: float | None = None
    init_weights: bool = flag(True)

    def validate(self) -> None:
        super().validate()
        eps = self.cayley_neumann_eps
        ok = eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 < eps < 1.0)
        if self.use_cayley_neumann and not ok:  # PEFT ignores it (with a warning) without the series
            raise ConfigError(f"PsoftConfig.cayley_neumann_eps: expected None or a number with 0 < x < 1, "
                              f"got {eps!r}")

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Rank 2 fits every toy layer (the smallest has 3 outputs)."""
        return {"r": 2, "psoft_alpha": 4}


def principal_factors(w: torch.Tensor, config: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of the float32 (out, in) weight `w`, with s B A = U_r S_r V_r^T."""
    r = config.r
    if config.psoft_svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # randomized: seeded on a forked CPU RNG so a reload rebuilds the same factors
        fork = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(config.random_seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=config.psoft_svd_lowrank_niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].t()
    s = s / (config.psoft_alpha / r)
    if config.ab_svd_init == "psoft_init":
        return vh.contiguous(), (u @ torch.diag(s)).contiguous()
    root = torch.diag(torch.sqrt(s))
    return (root @ vh).contiguous(), (u @ root).contiguous()


class PsoftRotation(nn.Module):
    """The trained r x r transform: `weight` (the skew generator's upper triangle, or the free matrix) and
    the optional row / column magnitudes `vector_b`, `vector_a` (PEFT's psoft_R.* keys)."""

    def __init__(self, config: PsoftConfig) -> None:
        super().__init__()
        r = self.size = config.r
        self.orth, self.neumann = config.psoft_orth, config.use_cayley_neumann
        self.terms, self.eps = config.num_cayley_neumann_terms, config.cayley_neumann_eps
        if self.orth:
            self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2))
            rows, cols = torch.triu_indices(r, r, 1)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
        else:
            self.weight = nn.Parameter(torch.eye(r))
        self.vector_b = nn.Parameter(torch.ones(r)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r)) if config.psoft_mag_a else None
        if not config.init_weights:  # PEFT's test init: a random generator (or I + noise); magnitudes stay 1
            with torch.no_grad():
                if self.orth:
                    nn.init.normal_(self.weight, mean=0.0, std=0.1)
                else:
                    self.weight.add_(torch.randn_like(self.weight) * 0.1)

    def _series(self, q: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
        """The Cayley map's truncated Neumann series I + 2Q + 2Q^2 + ... + Q^(t-1) (t terms)."""
        if self.eps is not None:
            norm = torch.linalg.norm(q, ord="fro")
            if torch.isfinite(norm) and norm > self.eps:
                q = q * (self.eps / (norm + 1e-12))
        t, out = self.terms, eye.clone()
        if t > 1:
            out = out + 2.0 * q
        if t > 2:
            power = q @ q
            out = out + 2.0 * power
            for _ in range(3, t - 1):
                power = power @ q
                out = out + 2.0 * power
            out = out + power @ q
        return out

    def matrix(self) -> torch.Tensor:
        """R, (r, r): the (approximate) Cayley map or the free matrix, times the magnitudes."""
        if not self.orth:
            m = self.weight
        else:
            w = self.weight
            q = w.new_zeros(self.size, self.size).index_put((self.rows, self.cols), w)
            q = q - q.t()
            eye = torch.eye(self.size, device=w.device, dtype=w.dtype)
            if self.neumann:
                m = self._series(q, eye)
            else:  # X (I - Q) = I + Q
                half = w.dtype in (torch.float16, torch.bfloat16)
                qf, ef = (q.float(), eye.float()) if half else (q, eye)
                m = torch.linalg.solve(ef - qf, ef + qf, left=False).to(w.dtype)
        if self.vector_b is not None:
            m = self.vector_b[:, None] * m
        if self.vector_a is not None:
            m = m * self.vector_a[None, :]
        return m


class PsoftDelta(Delta):
    """PSOFT on a Linear (see the module docstring)."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Module, config: PsoftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        if config.r > min(geo.in_features, geo.out_features):
            raise ConfigError(f"PsoftConfig.r: expected at most min(in, out) = "
                              f"{min(geo.in_features, geo.out_features)} for '{path}' "
                              f"({geo.out_features} x {geo.in_features}), got {config.r}")
        weight = base.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"PsoftConfig: '{path}' has a {weight.dtype} weight; PSOFT's SVD init needs a float one")
        self.scaling = config.psoft_alpha / config.r
        a, b = principal_factors(weight.detach().to(torch.float32), config)
        # Frozen and rebuilt from W on load: not part of the saved state (PEFT does not save them either).
        self.register_buffer("psoft_A", a, persistent=False)
        self.register_buffer("psoft_B", b, persistent=False)
        self.psoft_R = PsoftRotation(config)
        self.dropout = nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else nn.Identity()
        self.identity_at_init = config.init_weights

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a = self.psoft_A
        h = self.dropout(x.to(a.dtype)) @ a.t()
        rotated = h @ self.psoft_R.matrix().to(h.dtype).t()
        change = (rotated - h) @ self.psoft_B.t()
        return (base_out + change * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        r = self.psoft_R.matrix()
        eye = torch.eye(r.shape[0], device=r.device, dtype=r.dtype)
        dw = self.psoft_B @ (r - eye) @ self.psoft_A * self.scaling
        return {"weight": dw.to(self.base.weight.dtype)}


register("psoft", PsoftConfig, PsoftDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,),
                                                        peft_compatible=True))
