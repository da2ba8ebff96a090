"""Merge operators on plain tensors: every function takes same-shape tensors (one per source) and float
weights and returns one tensor. Adapter-level and checkpoint-level merges are both built on these.

Conventions (chosen so results equal PEFT's merge utilities bit for bit where PEFT has the operator):
- Magnitude trimming keeps k = int(density * numel) entries picked by `torch.topk` on |t| (so density
  below 1/numel keeps nothing; ties between equal magnitudes are broken by topk's order). A density
  >= 1 keeps everything. `at_least_one=True` gives the checkpoint-merge rule k = max(1, k).
- Random (DARE) masks are one `torch.bernoulli` draw of a tensor filled with `density` per source, in
  source order, and no draw at all when density >= 1; a generator seeded with s gives the same masks as
  PEFT after `torch.manual_seed(s)`.
- Sign election: "total" takes the sign of the sum of values, "frequency" the sign of the sum of signs;
  a tie (zero) elects +1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.errors import ConfigError

__all__ = ["linear", "trim_mask", "elect_sign", "ties", "dare_mask", "dare_linear", "dare_ties",
           "magnitude_prune", "pcb", "svd_truncate", "slerp", "OPERATOR_PARAMS", "check_params", "operator"]


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    """ConfigError unless there is one weight per tensor and all tensors share a shape."""
    if not tensors:
        raise ConfigError("tensors: expected at least one tensor, got none")
    if len(weights) != len(tensors):
        raise ConfigError(f"weights: expected one weight per tensor ({len(tensors)}), got {len(weights)}")
    shape = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if tuple(t.shape) != shape:
            raise ConfigError(f"tensors[{i}]: expected shape {shape} (that of tensors[0]), got {tuple(t.shape)}")


def _check_density(density: float, field: str = "density") -> None:
    """ConfigError unless 0 < density <= 1."""
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise ConfigError(f"{field}: expected a number in (0, 1], got {density!r}")


def _weighted(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """stacked[i] * weights[i] with the weights as a tensor of stacked's dtype (broadcast over the rest)."""
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(w.shape + (1,) * (stacked.dim() - 1))


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = False) -> torch.Tensor:
    """Weighted sum of the tensors; with normalize, divided by the sum of the weights (if it is not ~0)."""
    _check(tensors, weights)
    out = _weighted(torch.stack(list(tensors)), weights).sum(dim=0)
    total = float(sum(weights))
    return out / total if normalize and abs(total) >= 1e-8 else out


def trim_mask(t: torch.Tensor, density: float, at_least_one: bool = False) -> torch.Tensor:
    """0/1 mask (t's dtype) of the k = int(density * numel) entries of largest |t| (all ones if density >= 1)."""
    if density >= 1:
        return torch.ones_like(t)
    if density < 0:
        raise ConfigError(f"density: expected a number >= 0, got {density!r}")
    k = int(density * t.numel())
    if at_least_one and t.numel():
        k = max(1, k)
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask.reshape(t.shape)


def elect_sign(tensors: Sequence[torch.Tensor] | torch.Tensor, method: str = "total") -> torch.Tensor:
    """Elected sign per entry (+1/-1, t's dtype): of the summed values ("total") or summed signs ("frequency")."""
    stacked = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method: expected 'total' or 'frequency', got {method!r}")
    return torch.where(mass >= 0, 1, -1).to(stacked.dtype)


def _consensus(pruned: torch.Tensor, weights: Sequence[float], majority_sign_method: str,
               divisor: str) -> torch.Tensor:
    """Sum of the weighted entries agreeing with the elected sign, divided per `divisor` (see `ties`)."""
    weighted = _weighted(pruned, weights)
    if divisor == "count":
        agree = pruned.sign() == elect_sign(pruned, majority_sign_method)
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    if divisor == "weights":
        agree = weighted.sign() == elect_sign(weighted, majority_sign_method)
        total = _weighted(agree.to(pruned.dtype), weights).sum(dim=0)
        total[total == 0] = 1
        return (weighted * agree).sum(dim=0) / total
    raise ConfigError(f"divisor: expected 'count' or 'weights', got {divisor!r}")


def ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         majority_sign_method: str = "total", divisor: str = "count") -> torch.Tensor:
    """TIES: trim each tensor to `density`, elect signs, average the weighted agreeing entries.

    divisor="count": signs elected on the trimmed tensors, the weighted agreeing sum divided by the number
    of agreeing non-zero entries (PEFT's disjoint merge). divisor="weights": signs elected on the weighted
    trimmed tensors, divided by the sum of the agreeing entries' weights (the normalized checkpoint merge).
    """
    _check(tensors, weights)
    _check_density(density)
    pruned = torch.stack([t * trim_mask(t, density) for t in tensors])
    return _consensus(pruned, weights, majority_sign_method, divisor)


def dare_mask(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random 0/1 mask keeping each entry with probability density (one bernoulli draw; none if density >= 1)."""
    if density >= 1:
        return torch.ones_like(t)
    return torch.bernoulli(torch.full_like(t, density), generator=generator)


def _dare(tensors: Sequence[torch.Tensor], density: float, generator, rescale: bool) -> torch.Tensor:
    """Stack of the randomly pruned tensors (divided by density when rescale), drawn in source order."""
    out = []
    for t in tensors:
        pruned = t * dare_mask(t, density, generator)
        out.append(pruned / density if rescale and density < 1 else pruned)
    return torch.stack(out)


def dare_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                generator: torch.Generator | None = None, rescale: bool = True) -> torch.Tensor:
    """DARE: drop entries at random (keep probability density), rescale by 1/density, weighted sum."""
    _check(tensors, weights)
    _check_density(density)
    return _weighted(_dare(tensors, density, generator, rescale), weights).sum(dim=0)


def dare_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
              generator: torch.Generator | None = None, majority_sign_method: str = "total",
              divisor: str = "count", rescale: bool = True) -> torch.Tensor:
    """DARE pruning followed by TIES sign election and disjoint averaging (divisor as in `ties`)."""
    _check(tensors, weights)
    _check_density(density)
    return _consensus(_dare(tensors, density, generator, rescale), weights, majority_sign_method, divisor)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Trim each tensor to its top-|t| `density` fraction, then take the weighted sum."""
    _check(tensors, weights)
    _check_density(density)
    pruned = torch.stack([t * trim_mask(t, density) for t in tensors])
    return _weighted(pruned, weights).sum(dim=0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Rows of x rescaled to [0, 1] by their min and max (a constant row becomes zeros)."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - lo) / torch.clamp(hi - lo, min=1e-12)


def _clamp_rows(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Clamp each row to [its int(d*low_ratio)-th, its int(d*(1-high_ratio)-1)-th smallest value]."""
    d = x.shape[1]
    ordered = torch.sort(x, dim=1).values
    lo = ordered[:, int(d * low_ratio)].unsqueeze(1)
    hi = ordered[:, max(0, int(d * (1 - high_ratio) - 1))].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def pcb(tensors: Sequence[torch.Tensor], weights: Sequence[float], ratio: float,
        min_ratio: float = 1e-4, max_ratio: float = 1e-4) -> torch.Tensor:
    """PCB merging: score entries by intra- and inter-task balancing, drop the low-scored, average the rest.

    Each tensor is one row x_i (flattened). Magnitudes are clipped per row to the [min_ratio, 1-max_ratio]
    order statistics (outliers). Intra-balancing: exp(n * minmax(|x_i|)^2); inter-balancing:
    tanh(x_i * sum_j x_j). Their product is clamped from below at each row's (1 - ratio) quantile and
    min-max normalised, so the lowest-scored (1 - ratio) fraction gets scale 0. The result is
    sum_i w_i * scale_i * x_i / sum_i scale_i (the scale is computed from the unweighted tensors).
    """
    _check(tensors, weights)
    _check_density(ratio, "ratio")
    shape = tensors[0].shape
    rows = torch.stack([t.reshape(-1) for t in tensors])
    n = rows.shape[0]
    magnitude = _clamp_rows(rows.abs(), min_ratio, max_ratio)
    clipped = rows.sign() * magnitude
    intra = torch.exp(n * _minmax(magnitude) ** 2)
    inter = torch.tanh(rows * rows.sum(dim=0))
    scale = _minmax(_clamp_rows(intra * inter, 1 - ratio, 0.0))
    merged = (_weighted(clipped * scale, weights)).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return merged.reshape(shape)


def svd_truncate(delta_2d: torch.Tensor, rank: int, clamp: float | None = None,
                 full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-`rank` approximation of delta_2d; B = U_r diag(S_r), A = Vh_r.

    With clamp=q, both factors are clipped to [-h, h], h the q-quantile of all their entries together.
    A rank above min(out, in) is padded with zero columns of B / rows of A so the shapes are (out, rank)
    and (rank, in).
    """
    if delta_2d.dim() != 2:
        raise ConfigError(f"delta_2d: expected a 2-D tensor, got shape {tuple(delta_2d.shape)}")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank: expected a positive integer, got {rank!r}")
    u, s, vh = torch.linalg.svd(delta_2d, full_matrices=full_matrices)
    keep = min(rank, s.shape[0])
    b = u[:, :keep] @ torch.diag(s[:keep])
    a = vh[:keep, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if keep < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], dim=0)
    return b, a


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995,
          rowwise: bool = False) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) by the angle of their normalised directions.

    Falls back to (1-t) a + t b when |cos| > dot_threshold (nearly colinear). rowwise=True takes one
    angle per leading-axis row instead of one for the whole tensor. Norms below eps count as 1.
    """
    if a.shape != b.shape:
        raise ConfigError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    rows = a.shape[0] if rowwise and a.dim() else 1
    x, y = a.reshape(rows, -1).to(dtype), b.reshape(rows, -1).to(dtype)
    nx = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    ny = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    nx, ny = torch.where(nx > eps, nx, 1), torch.where(ny > eps, ny, 1)
    dot = ((x / nx) * (y / ny)).sum(dim=1, keepdim=True).clamp(-1, 1)
    near = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(near, 0, dot))
    sin = torch.where(near, 1, torch.sin(theta))
    ca = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / sin)
    cb = torch.where(near, t, torch.sin(t * theta) / sin)
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


# ---- the operator table: parameters (checked, defaults filled) and dispatch by name ----------------

# The keyword parameters each operator reads, with their defaults (None: required).
OPERATOR_PARAMS: dict[str, dict] = {
    "linear": {"normalize": False},
    "cat": {},
    "ties": {"density": None, "majority_sign_method": "total", "divisor": "count"},
    "dare_linear": {"density": None, "rescale": True, "seed": None},
    "dare_ties": {"density": None, "majority_sign_method": "total", "divisor": "count", "rescale": True,
                  "seed": None},
    "magnitude_prune": {"density": None},
    "pcb": {"ratio": None, "min_ratio": 1e-4, "max_ratio": 1e-4},
}


def _number(value, field: str, low: float, high: float, low_open: bool = True) -> float:
    """value as a float; ConfigError unless it is a finite number in (low, high] (or [low, high])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{field}: expected a number in {span}, got {value!r}")
    return float(value)


def check_params(op: str, params: dict, extra: dict | None = None, method: str | None = None) -> dict:
    """Operator `op`'s parameters (plus `extra` ones) with defaults filled; ConfigError naming a bad one."""
    method = method or op
    allowed = {**OPERATOR_PARAMS[op], **(extra or {})}
    for key in params:
        if key not in allowed:
            raise ConfigError(f"{key}: not a parameter of method {method!r}; expected some of {sorted(allowed)}")
    out = {**allowed, **params}
    for key in ("density", "ratio"):
        if key in out:
            if out[key] is None:
                raise ConfigError(f"{key}: required for method {method!r} (a number in (0, 1])")
            out[key] = _number(out[key], key, 0.0, 1.0)
    for key in ("min_ratio", "max_ratio"):
        if key in out:
            out[key] = _number(out[key], key, 0.0, 0.5, low_open=False)
    if out.get("majority_sign_method", "total") not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method: expected 'total' or 'frequency', got {out['majority_sign_method']!r}")
    if out.get("divisor", "count") not in ("count", "weights"):
        raise ConfigError(f"divisor: expected 'count' or 'weights', got {out['divisor']!r}")
    for key in ("normalize", "rescale", "svd_full_matrices"):
        if key in out and not isinstance(out[key], bool):
            raise ConfigError(f"{key}: expected True or False, got {out[key]!r}")
    for key, low in (("seed", 0), ("svd_rank", 1)):
        value = out.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{key}: expected an integer >= {low} or None, got {value!r}")
    if out.get("svd_clamp") is not None:
        out["svd_clamp"] = _number(out["svd_clamp"], "svd_clamp", 0.0, 1.0, low_open=False)
    return out


def operator(op: str, p: dict, generator: torch.Generator | None = None):
    """(tensors, weights) -> tensor for operator `op` with its checked parameters `p` (see check_params)."""
    if op == "linear":
        return lambda ts, w: linear(ts, w, p["normalize"])
    if op == "ties":
        return lambda ts, w: ties(ts, w, p["density"], p["majority_sign_method"], p["divisor"])
    if op == "dare_linear":
        return lambda ts, w: dare_linear(ts, w, p["density"], generator, p["rescale"])
    if op == "dare_ties":
        return lambda ts, w: dare_ties(ts, w, p["density"], generator, p["majority_sign_method"], p["divisor"],
                                       p["rescale"])
    if op == "magnitude_prune":
        return lambda ts, w: magnitude_prune(ts, w, p["density"])
    if op == "pcb":
        return lambda ts, w: pcb(ts, w, p["ratio"], p["min_ratio"], p["max_ratio"])
    known = sorted(set(OPERATOR_PARAMS) - {"cat"})
    raise ConfigError(f"method: {op!r} is not a tensor operator; expected one of {known}")
