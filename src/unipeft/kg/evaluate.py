"""Filtered ranking metrics on hard answers, per query structure (BetaE's protocol)."""
from __future__ import annotations

import torch
from torch import nn

from .cqd import CQDConfig, answer_in_chunks
from .querygen import QuerySet
from .structures import NEGATION, POSITIVE

METRICS: tuple[str, ...] = ("mrr", "hits@1", "hits@3", "hits@10")


def hard_answer_ranks(scores: torch.Tensor, answers: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """(Q, N) rank of each hard answer among the non-answers (other answers filtered), NaN elsewhere.

    Ties count half, so a constant score ranks an answer mid-field rather than first or last.
    """
    out = torch.full(scores.shape, float("nan"), dtype=torch.float64)
    for start in range(0, scores.shape[0], 64):
        s = scores[start:start + 64]
        rival = ~answers[start:start + 64]
        cmp_s = s[:, None, :]          # (q, 1, N): rivals' scores
        own = s[:, :, None]            # (q, N, 1): each candidate answer's score
        better = ((cmp_s > own) & rival[:, None, :]).sum(2)
        ties = ((cmp_s == own) & rival[:, None, :]).sum(2)
        ranks = 1.0 + better.double() + ties.double() / 2
        h = hard[start:start + 64]
        out[start:start + 64][h] = ranks[h]
    return out


def query_metrics(scores: torch.Tensor, answers: torch.Tensor, hard: torch.Tensor) -> dict[str, float]:
    """MRR and Hits@1/3/10 averaged over hard answers within a query, then over queries."""
    ranks = hard_answer_ranks(scores, answers, hard)
    valid = hard.any(1)
    counts = hard[valid].sum(1).double()
    r = ranks[valid]
    out = {"mrr": (torch.nan_to_num(1.0 / r, nan=0.0).sum(1) / counts).mean().item()}
    for k in (1, 3, 10):
        out[f"hits@{k}"] = ((r <= k).double().sum(1) / counts).mean().item()  # NaN <= k is False
    out["queries"] = int(valid.sum())
    return out


def summarize(per_structure: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean MRR over all structures, over the positive (EPFO) ones and over the negation ones."""
    def mean(names: list[str]) -> float | None:
        vals = [per_structure[n]["mrr"] for n in names if n in per_structure]
        return round(sum(vals) / len(vals), 4) if vals else None

    return {"avg_mrr": mean(list(per_structure)), "avg_mrr_positive": mean(list(POSITIVE)),
            "avg_mrr_negation": mean(list(NEGATION))}


def evaluate_queries(model: nn.Module, queries: dict[str, QuerySet], n_entities: int,
                     cfg: CQDConfig | None = None) -> dict:
    """Per-structure metrics of CQD with `model` (a predictor, calibrated or not) plus averages."""
    per: dict[str, dict[str, float]] = {}
    for name, qs in queries.items():
        if len(qs) == 0:
            continue
        scores = answer_in_chunks(model, name, qs.queries, n_entities, cfg)
        per[name] = {k: round(v, 4) if isinstance(v, float) else v
                     for k, v in query_metrics(scores, qs.answers, qs.hard).items()}
    return {"per_structure": per, **summarize(per)}
