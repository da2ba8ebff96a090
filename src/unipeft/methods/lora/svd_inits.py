"""SVD-family LoRA inits: the adapter starts on a chosen rank-r part of W and the base keeps the rest.

Every init here returns (A, B) and the residual base weight W - s B A (s = the delta's scaling), so
the adapted model equals the base at init; core writes the residual and restores W bit for bit on
unload/delete. Matrix layers only (Linear, GPT-2 Conv1D, quantized linears: W dense (out, in)).

  pissa           principal r singular triplets: A = sqrt(S/s) V^T, B = U sqrt(S/s)   (PEFT's "pissa")
  pissa_niter_K   the same from torch.svd_lowrank with K subspace iterations     (PEFT's "pissa_niter_K")
  olora           W = QR: B = Q[:, :r], A = R[:r]                                   (PEFT's "olora")
  milora          the r *smallest* singular triplets (MiLoRA, Wang et al. 2024)
  nlora           principal subspace from a Nystrom sketch of widths 2r / 4r, no full SVD (NLoRA)
  svfit / sorsa   principal triplets with the singular values split out into a trained diagonal
                  (variants "svfit": only the diagonal trains; "sorsa": U, S, V^T train, with the
                  orthonormality regulariser), see svd_variants.py
  loldu           W = P L D U (LU with partial pivoting): B = P L_r, A = D_r U_r / s; the variant
                  "loldu" trains D_r and a scalar between the frozen factors (LoLDU, Shi et al. 2024)
"""
from __future__ import annotations

import torch

from ...core.errors import ConfigError
from ...core.targets import pattern_key
from .inits import InitContext, InitResult, register_init


def rank_field(ctx: InitContext) -> str:
    """The config field that set this layer's rank: 'LoraConfig.r' or its rank_pattern entry."""
    key = pattern_key(ctx.config.rank_pattern, ctx.path)
    return f"LoraConfig.rank_pattern[{key!r}]" if key else "LoraConfig.r"


def dense_fp32(ctx: InitContext, strict: bool = False) -> torch.Tensor:
    """The (out, in) weight in float32, after checking the layer is a matrix and r fits it
    (r <= min(out, in); r < min(out, in) when `strict`)."""
    if len(ctx.a_shape) != 2:
        raise ConfigError(f"LoraConfig.init={ctx.config.init!r}: '{ctx.path}' is not a matrix layer "
                          f"(SVD-family inits decompose Linear / Conv1D weights)")
    out_f, in_f = ctx.weight.shape
    k = min(out_f, in_f)
    if ctx.r > k or (strict and ctx.r == k):
        bound = f"< {k}" if strict else f"<= {k}"
        raise ConfigError(f"{rank_field(ctx)}: init={ctx.config.init!r} needs a rank {bound} = min(out, in) "
                          f"of '{ctx.path}' ({out_f} x {in_f}), got {ctx.r}")
    return ctx.weight.detach().to(torch.float32)


def scaling(ctx: InitContext) -> float:
    """The delta's scaling s (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    return ctx.config.scaling(ctx.path)


def _residual(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ctx: InitContext) -> InitResult:
    """(A, B) with the base left at W - s B A, in the base's dtype."""
    return InitResult(a, b, base_weight=(w - scaling(ctx) * b @ a).to(ctx.weight.dtype))


def _split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, ctx: InitContext) -> tuple:
    """(A, B) = (sqrt(S/s) V^T, U sqrt(S/s)): s B A = U S V^T (PEFT's PiSSA convention)."""
    root = torch.diag(torch.sqrt(s / scaling(ctx)))
    return root @ vh, u @ root


def _pissa(ctx: InitContext) -> InitResult:
    w = dense_fp32(ctx)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a, b = _split_sqrt(u[:, :ctx.r], s[:ctx.r], vh[:ctx.r], ctx)
    return _residual(w, a, b, ctx)


def _pissa_niter(ctx: InitContext, arg: int) -> InitResult:
    w = dense_fp32(ctx)
    u, s, v = torch.svd_lowrank(w, ctx.r, niter=arg)  # randomized: draws from the global RNG, as PEFT
    a, b = _split_sqrt(u, s, v.t(), ctx)
    return _residual(w, a, b, ctx)


def _olora(ctx: InitContext) -> InitResult:
    w = dense_fp32(ctx)
    q, r = torch.linalg.qr(w)
    return _residual(w, r[:ctx.r].contiguous(), q[:, :ctx.r].contiguous(), ctx)


def _milora(ctx: InitContext) -> InitResult:
    w = dense_fp32(ctx)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a, b = _split_sqrt(u[:, -ctx.r:], s[-ctx.r:], vh[-ctx.r:], ctx)
    return _residual(w, a, b, ctx)


def nystrom_svd(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r (U, S, V^T) of W from a generalized Nystrom sketch W ~ Q (Y^T Q)^+ Y^T W, Q = orth(W X),
    X and Y Gaussian of widths min(2r, k) and min(4r, out) (the sketch size is a function of r only):
    thin QR, a small least-squares solve and an SVD of a (2r x in) matrix, never an SVD of W itself."""
    out_f, in_f = w.shape
    x = torch.randn(in_f, min(2 * r, out_f, in_f), dtype=w.dtype, device=w.device)
    y = torch.randn(out_f, min(4 * r, out_f), dtype=w.dtype, device=w.device)
    q, _ = torch.linalg.qr(w @ x)
    core = torch.linalg.lstsq(y.t() @ q, y.t() @ w).solution  # (2r x in): W ~ Q core
    um, sm, vh = torch.linalg.svd(core, full_matrices=False)
    return q @ um[:, :r], sm[:r], vh[:r]


def _nlora(ctx: InitContext) -> InitResult:
    w = dense_fp32(ctx)
    u, s, vh = nystrom_svd(w, ctx.r)
    a, b = _split_sqrt(u, s, vh, ctx)
    return _residual(w, a, b, ctx)


def _principal_diag(ctx: InitContext) -> InitResult:
    """B = U_r, A = diag(S_r / s) V_r^T: the variant splits the row norms of A out as its diagonal."""
    w = dense_fp32(ctx)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = ctx.r
    return _residual(w, (s[:r] / scaling(ctx))[:, None] * vh[:r], u[:, :r].contiguous(), ctx)


def _loldu(ctx: InitContext) -> InitResult:
    """B = P L_r, A = U_lu[:r] / s (= D_r U_r / s: the variant splits D_r out of A's diagonal)."""
    w = dense_fp32(ctx)
    p, low, up = torch.linalg.lu(w)
    r = ctx.r
    if (up.diagonal()[:r] == 0).any():
        raise ConfigError(f"LoraConfig.init='loldu': the weight of '{ctx.path}' has a zero pivot among its first "
                          f"{r} (it is rank-deficient); use a smaller {rank_field(ctx)} or another init")
    return _residual(w, up[:r] / scaling(ctx), p @ low[:, :r], ctx)


register_init("pissa", _pissa)
register_init("pissa_niter_", _pissa_niter, prefix=True)
register_init("olora", _olora)
register_init("milora", _milora)
register_init("nlora", _nlora)
register_init("svfit", _principal_diag, variant="svfit")
register_init("sorsa", _principal_diag, variant="sorsa")
register_init("loldu", _loldu, variant="loldu")
