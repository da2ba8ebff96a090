"""CQD-Beam (Arakelyan et al. 2021): answer complex queries with a frozen link predictor and t-norms.

Every sub-query denotes a fuzzy set of entities, a (B, N) tensor of truth degrees in [0, 1]:
  anchor        one-hot
  projection    out[t] = max over the k best sources v of  T(set[v], p(r, v, t))   (beam search)
  intersection  T-norm of the parts;  union: its T-conorm;  negation: 1 - x
p(r, v, t) is the atom's truth degree: sigmoid of the predictor's (possibly calibrated) score.
With beam k = N the max runs over every assignment of the variables, so chains are answered
exactly as CQD's combinatorial optimisation would; smaller k is CQD's beam approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from .structures import STRUCTURES, check_structures, fold

TNORMS: tuple[str, ...] = ("prod", "min")
NORMALIZERS: tuple[str, ...] = ("sigmoid", "minmax")


@dataclass
class CQDConfig:
    """How atoms are scored and combined."""

    tnorm: str = "prod"          # "prod" (product) or "min" (Goedel)
    beam: int | None = None      # candidates kept per variable; None = every entity
    normalize: str = "sigmoid"   # atom score -> [0, 1]: "sigmoid", or per-row "minmax" (CQD's option)

    def __post_init__(self) -> None:
        if self.tnorm not in TNORMS:
            raise ConfigError(f"CQDConfig.tnorm: expected one of {TNORMS}, got {self.tnorm!r}")
        if self.normalize not in NORMALIZERS:
            raise ConfigError(f"CQDConfig.normalize: expected one of {NORMALIZERS}, got {self.normalize!r}")
        if self.beam is not None and self.beam <= 0:
            raise ConfigError(f"CQDConfig.beam: expected a positive integer or None, got {self.beam!r}")


def t_norm(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Fuzzy conjunction: product or minimum."""
    out = parts[0]
    for p in parts[1:]:
        out = out * p if kind == "prod" else torch.minimum(out, p)
    return out


def t_conorm(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Fuzzy disjunction dual to the t-norm: probabilistic sum or maximum."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p - out * p if kind == "prod" else torch.maximum(out, p)
    return out


def atom_truth(model: nn.Module, heads: torch.Tensor, rels: torch.Tensor, normalize: str = "sigmoid") -> torch.Tensor:
    """Truth degrees (B, N) in [0, 1] of r(h, t) for every t, in float64 so that scores do not saturate."""
    logits = model(torch.stack([heads, rels], 1)).double()
    if normalize == "sigmoid":
        return torch.sigmoid(logits)
    lo, hi = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
    return (logits - lo) / (hi - lo).clamp_min(1e-12)


class _Anchor:
    """An anchor set not yet expanded to one-hot: projecting it needs one atom call per query."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids


def answer_queries(model: nn.Module, structure: str, queries: torch.Tensor, n_entities: int,
                   cfg: CQDConfig | None = None) -> torch.Tensor:
    """Truth degree (B, N) of every entity as the answer of each query row of `structure`."""
    cfg = cfg or CQDConfig()
    check_structures([structure])

    def as_set(x) -> torch.Tensor:
        if isinstance(x, _Anchor):
            return torch.nn.functional.one_hot(x.ids, n_entities).double()
        return x

    def project(sub, rels: torch.Tensor) -> torch.Tensor:
        if isinstance(sub, _Anchor):
            return atom_truth(model, sub.ids, rels, cfg.normalize)
        k = min(cfg.beam or n_entities, n_entities)
        vals, idx = sub.topk(k, dim=1)  # (B, k): the beam of candidate sources
        atoms = atom_truth(model, idx.reshape(-1), rels.repeat_interleave(k), cfg.normalize)
        atoms = atoms.view(sub.shape[0], k, n_entities)
        return t_norm([vals[:, :, None], atoms], cfg.tnorm).max(1).values

    return fold(STRUCTURES[structure], queries, anchor=_Anchor, project=project,
                conj=lambda ps: t_norm([as_set(p) for p in ps], cfg.tnorm),
                disj=lambda ps: t_conorm([as_set(p) for p in ps], cfg.tnorm),
                neg=lambda p: 1.0 - as_set(p))


@torch.no_grad()
def answer_in_chunks(model: nn.Module, structure: str, queries: torch.Tensor, n_entities: int,
                     cfg: CQDConfig | None = None, chunk: int = 256) -> torch.Tensor:
    """`answer_queries` without gradients, `chunk` query rows at a time (bounded memory)."""
    parts = [answer_queries(model, structure, queries[i:i + chunk], n_entities, cfg)
             for i in range(0, queries.shape[0], chunk)]
    if not parts:
        return torch.zeros(0, n_entities, dtype=torch.float64)
    return torch.cat(parts)
