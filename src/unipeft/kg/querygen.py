"""Complex-query generation (BetaE protocol) with hard answers that need a link missing from training.

train queries: grounded on the training graph; every answer is a training target.
valid queries: grounded on train+valid; hard answers = answers there minus answers on train.
test queries:  grounded on train+valid+test; hard = answers there minus answers on train+valid.
Deterministic: the same (dataset, seed, counts) give the same queries on any machine.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from .datasets import KGDataset
from .structures import NEGATION, STRUCTURES, Template, answers, check_structures, slot_kinds

# split -> (graph the answers come from, graph whose answers are "easy")
SPLIT_GRAPHS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "train": (("train",), None),
    "valid": (("train", "valid"), ("train",)),
    "test": (("train", "valid", "test"), ("train", "valid")),
}


@dataclass
class QuerySet:
    """Queries of one structure in one split; `answers` are all answers, `hard` the ones to rank."""

    structure: str
    queries: torch.Tensor  # (Q, slots) long
    answers: torch.Tensor  # (Q, N) bool: every answer on the split's graph (filtered when ranking)
    hard: torch.Tensor     # (Q, N) bool: answers needing a link outside the easier graph

    def __len__(self) -> int:
        return int(self.queries.shape[0])

    def subset(self, index: torch.Tensor) -> "QuerySet":
        """The queries at `index`."""
        return QuerySet(self.structure, self.queries[index], self.answers[index], self.hard[index])


class _Grounder:
    """Samples a query row of a template backwards from a target entity, along edges of `adj`."""

    def __init__(self, incoming: dict[int, list[tuple[int, int]]], rng: random.Random) -> None:
        self.incoming = incoming
        self.targets = sorted(incoming)
        self.rng = rng

    def ground(self, node: Template, target: int, row: list[int]) -> bool:
        kind = node[0]
        if kind == "e":
            row[node[1]] = target
            return True
        if kind == "p":
            edges = self.incoming.get(target)
            if not edges:
                return False
            head, rel = self.rng.choice(edges)
            row[node[1]] = rel
            return self.ground(node[2], head, row)
        if kind == "n":  # the negated branch answers something else
            return self.ground(node[1], self.rng.choice(self.targets), row)
        return all(self.ground(child, target, row) for child in node[1:])

    def sample(self, structure: str, width: int) -> list[int] | None:
        row = [-1] * width
        ok = self.ground(STRUCTURES[structure], self.rng.choice(self.targets), row)
        return row if ok else None


def _split_graphs(data: KGDataset, split: str):
    """(answer graph, easy graph or None, tail -> [(head, relation)] of the answer graph), built once per split."""
    key = ("querygen", split)
    if key not in data.cache:
        full_splits, easy_splits = SPLIT_GRAPHS[split]
        full = data.graph(*full_splits)
        incoming: dict[int, list[tuple[int, int]]] = {}
        r, h, t = full.nonzero(as_tuple=True)
        for rel, head, tail in zip(r.tolist(), h.tolist(), t.tolist()):
            incoming.setdefault(tail, []).append((head, rel))
        easy = data.graph(*easy_splits).float() if easy_splits else None
        data.cache[key] = (full.float(), easy, incoming)
    return data.cache[key]


def default_max_answers(n_entities: int) -> int:
    """Queries with more answers are dropped (BetaE drops > 100 of 14,505 on FB15k-237)."""
    return max(3, math.ceil(0.2 * n_entities))


def generate_split(data: KGDataset, split: str, structure: str, n: int, seed: int,
                   max_answers: int | None = None, max_rounds: int = 40) -> QuerySet:
    """Up to `n` distinct queries of `structure` for `split` (fewer if the graph has fewer)."""
    if split not in SPLIT_GRAPHS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLIT_GRAPHS)}")
    check_structures([structure])
    if n < 0:
        raise ConfigError(f"generate_split: n must be >= 0, got {n}")
    full, easy, incoming = _split_graphs(data, split)
    cap = max_answers or default_max_answers(data.n_entities)
    rng = random.Random(f"unipeft-kg/{data.name}/{seed}/{split}/{structure}")
    grounder = _Grounder(incoming, rng)
    seen: set[tuple[int, ...]] = set()
    width = len(slot_kinds(structure))
    kept_q, kept_a, kept_h = [], [], []
    count = 0
    for _ in range(max_rounds):
        if count >= n:
            break
        rows = []
        for _ in range(max(64, 4 * (n - count))):
            row = grounder.sample(structure, width)
            if row is not None and tuple(row) not in seen:
                seen.add(tuple(row))
                rows.append(row)
        if not rows:
            continue
        q = torch.tensor(rows, dtype=torch.long)
        ans = answers(structure, q, full)
        hard = ans if easy is None else ans & ~answers(structure, q, easy)
        size = ans.sum(1)
        keep = (size > 0) & (size <= cap) & hard.any(1)
        if structure in NEGATION:  # the negation must matter: it removes at least one answer (BetaE)
            keep &= (ans != answers(structure, q, full, drop_negation=True)).any(1)
        idx = keep.nonzero(as_tuple=True)[0][: n - count]
        kept_q.append(q[idx]), kept_a.append(ans[idx]), kept_h.append(hard[idx])
        count += len(idx)
    if not kept_q:
        empty = torch.zeros(0, data.n_entities, dtype=torch.bool)
        return QuerySet(structure, torch.zeros(0, width, dtype=torch.long), empty, empty.clone())
    return QuerySet(structure, torch.cat(kept_q), torch.cat(kept_a), torch.cat(kept_h))


def generate_queries(data: KGDataset, structures: list[str] | tuple[str, ...] = tuple(STRUCTURES),
                     n_train: int = 2000, n_valid: int = 100, n_test: int = 300, seed: int = 0,
                     max_answers: int | None = None) -> dict[str, dict[str, QuerySet]]:
    """{split: {structure: QuerySet}} for every structure, `n_<split>` queries each at most.

    A test query may also occur among the training queries (as 1p queries (h, r) do): its
    training answers are then its easy answers, never its hard ones.
    """
    structures = check_structures(structures)
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    return {split: {s: generate_split(data, split, s, n, seed, max_answers) for s in structures}
            for split, n in counts.items()}


def query_stats(queries: dict[str, dict[str, QuerySet]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per split and structure: number of queries and mean numbers of answers / hard answers."""
    return {split: {s: {"queries": len(qs),
                        "answers": round(qs.answers.sum(1).double().mean().item(), 2) if len(qs) else 0.0,
                        "hard": round(qs.hard.sum(1).double().mean().item(), 2) if len(qs) else 0.0}
                    for s, qs in by_s.items()}
            for split, by_s in queries.items()}
