"""OSF (Orthogonal Subspace Fine-tuning, "Sculpting Subspaces" for continual learning): the SVD of a
layer's weight is split into a frozen high part and a trained low part,

    W = U_h S_h V_h^T + U_l S_l V_l^T,

and only the low triplets (U_l, S_l, V_l: PEFT's `osf_svd_params.U_low / S_low / V_low`, V_l stored as
rows) are trained, with gradients of U_l and V_l projected away from the frozen high subspace (the
column space of U_h, the row space of V_h^T), so what earlier tasks wrote there is kept.

The top `effective_rank` triplets are frozen (None: half of min(out, in); a float in (0, 1]: that
share of min(out, in); `rank_pattern` overrides it per module, the first regex found in the module's
path winning, as PEFT matches). The layer's output is W x + (U_l S_l V_l - U_l0 S_l0 V_l0) x, with the
low triplets as taken at build time kept as frozen buffers (rebuilt from the base weight on load, never
saved): the base weight itself is not edited, the update is an additive output delta, and at init
(`init_weights=True`) both low products are computed alike, so it is exactly zero where no gradient is
taken; a training forward computes it as PEFT does, one rank-2r product (zero up to rounding at init).
`init_weights=False` draws the trained triplets from a normal distribution (PEFT's test init).

Unlike PEFT (whose OSF layer applies only the first active adapter and cannot unmerge), every active
adapter applies and unmerge subtracts the merged delta. Linear layers only; target_modules is required.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import Rule, is_int, ruled
from ...core.registry import Capabilities, register


def _rank_ok(v: Any) -> bool:
    """A number > 0: a float in (0, 1] is a share of min(out, in), anything else a count."""
    return (is_int(v) or isinstance(v, float)) and v > 0


_RANK = "a positive integer (or a float share 0 < x <= 1 of min(out, in))"


@dataclass
class OSFConfig(AdapterConfig):
    """OSF: the top effective_rank singular triplets of W stay frozen; the rest train, orthogonally to them."""

    peft_class = "OSFConfig"
    peft_type = "OSF"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")
    peft_inert = {"target_svd_config": None}  # accepted and ignored by PEFT too

    effective_rank: int | float | None = ruled(None, Rule(_rank_ok, _RANK, optional=True))
    rank_pattern: dict[str, int | float] | None = ruled(
        None, Rule(lambda v: isinstance(v, dict) and all(isinstance(k, str) and _rank_ok(r) for k, r in v.items()),
                   f"a dict of module regex -> {_RANK}", optional=True))
    init_weights: bool | None = ruled(True, Rule(lambda v: v is None or isinstance(v, bool), "True, False or None "
                                                 "(None: as True, as PEFT reads it)"))

    def frozen_rank(self, path: str, min_dim: int) -> int:
        """The number of frozen (high) triplets at `path`, PEFT's resolution of the rank fields."""
        value = self.effective_rank
        for pattern, rank in (self.rank_pattern or {}).items():
            if re.search(pattern, path):
                value = rank
                break
        if value is None:
            return min_dim // 2
        rank = int(min_dim * value) if isinstance(value, float) and value <= 1.0 else int(value)
        return max(min(min_dim, rank), 0)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """One frozen triplet: every toy layer keeps at least two trained ones."""
        return {"effective_rank": 1}


def _project(grad: torch.Tensor, basis: torch.Tensor, complement: bool, left: bool) -> torch.Tensor:
    """A parameter's gradient projected (PEFT's gradient hook): `basis` spans a subspace by its columns
    (`left`: (n, k), g -> P g) or by its rows ((k, n), g -> g P); P projects onto that subspace, or onto
    its orthogonal complement with `complement`."""
    proj = basis @ (basis.t() @ grad) if left else (grad @ basis.t()) @ basis
    return grad - proj if complement else proj


class _LowChange(torch.autograd.Function):
    """x (U S V - U0 S0 V0)^T. Forward with `exact`: the two rank-r products apart, so that at init
    (equal factors) the change is exactly 0; else as one rank-2r pair x [V; V0]^T [U S, -U0 S0]^T
    (PEFT's form: two products instead of four, equal up to rounding). Backward: the input gradient
    through the rank-2r pair either way."""

    @staticmethod
    def forward(ctx, x, u, s, v, u0s0, v0, u_basis, v_basis, complements, exact):
        us = u * s.unsqueeze(0)
        if exact:
            h = x @ v.t()
            out = h @ us.t() - (x @ v0.t()) @ u0s0.t()
        else:
            h = x @ torch.cat([v, v0]).t()
            out = h @ torch.cat([us, -u0s0], dim=1).t()
            h = h[..., :v.shape[0]]
        ctx.save_for_backward(x, h, u, s, v, u0s0, v0, u_basis, v_basis)
        ctx.complements = complements
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, u, s, v, u0s0, v0, u_basis, v_basis = ctx.saved_tensors
        r, us = v.shape[0], u * s.unsqueeze(0)
        g, x2, h2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]), h.reshape(-1, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gh = g @ torch.cat([us, -u0s0], dim=1)
            grad_x = (gh @ torch.cat([v, v0])).reshape(x.shape)
            gh = gh[:, :r]
        else:
            gh = g @ us
        g_us = g.t() @ h2
        u_comp, v_comp = ctx.complements
        grad_u = _project(g_us * s.unsqueeze(0), u_basis, u_comp, True)
        grad_v = _project(gh.t() @ x2, v_basis, v_comp, False)
        return grad_x, grad_u, (g_us * u).sum(0), grad_v, None, None, None, None, None, None


class OSFDelta(Delta):
    """OSF on a Linear (see the module docstring)."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Module, config: OSFConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        out_f, in_f = geo.out_features, geo.in_features
        k = config.frozen_rank(path, min(out_f, in_f))
        if k <= 0:
            raise ConfigError(f"OSFConfig.effective_rank: '{path}' ({out_f} x {in_f}) resolves to {k} frozen "
                              f"triplets; expected at least 1 (raise effective_rank or its rank_pattern entry)")
        weight = base.weight.detach()
        u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        dtype = weight.dtype
        low = [t.contiguous().to(dtype) for t in (u[:, k:], s[k:], vh[k:])]
        self.effective_rank = k
        for name, t in zip(("U_low_init", "S_low_init", "V_low_init"), low):
            self.register_buffer(name, t.clone(), persistent=False)
        self.register_buffer("US_low_init", low[0] * low[1].unsqueeze(0), persistent=False)  # used every step
        # Projection bases: the trained low factor's complement when the factor is square (exact), else
        # the frozen high factor (the low one then misses the null space), as PEFT chooses.
        self._u_from_high = out_f > in_f
        self._v_from_high = out_f < in_f
        self.register_buffer("U_high", u[:, :k].contiguous().to(dtype) if self._u_from_high else None,
                             persistent=False)
        self.register_buffer("V_high", vh[:k].contiguous().to(dtype) if self._v_from_high else None,
                             persistent=False)
        random_init = config.init_weights is False
        if random_init:
            low = [torch.randn_like(t) for t in low]
        self.osf_svd_params = nn.ParameterDict({n: nn.Parameter(t.clone()) for n, t in
                                                zip(("U_low", "S_low", "V_low"), low)})
        self.identity_at_init = not random_init

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.osf_svd_params
        # The gradient projections live in _LowChange's backward: the trained low factor's complement
        # when the factor is square (exact), else the frozen high factor, as PEFT chooses.
        u_basis = self.U_high if self._u_from_high else self.U_low_init
        v_basis = self.V_high if self._v_from_high else self.V_low_init
        # Exact where no gradient is taken (inference, checks of the identity); PEFT's cheaper form in training.
        exact = not (torch.is_grad_enabled() and p["S_low"].requires_grad)
        change = _LowChange.apply(x.to(p["U_low"].dtype), p["U_low"], p["S_low"], p["V_low"], self.US_low_init,
                                  self.V_low_init, u_basis, v_basis, (self._u_from_high, self._v_from_high), exact)
        return (base_out + change).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        p = self.osf_svd_params
        current = (p["U_low"] * p["S_low"].unsqueeze(0)) @ p["V_low"]
        initial = self.US_low_init @ self.V_low_init
        return {"weight": (current - initial).to(self.base.weight.dtype)}


register("osf", OSFConfig, OSFDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,),
                                                  peft_compatible=True))
