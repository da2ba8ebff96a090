"""Query structures (BetaE's 1p ... pni) as templates, and their exact answers on a graph.

A query of a structure is a row of ints; the template says which slot holds an anchor entity
and which a relation. Template nodes:
  ("e", i)            anchor entity in slot i
  ("p", j, child)     projection: tails of relation slot j from the child's entity set
  ("i", c1, c2, ...)  intersection      ("u", c1, c2, ...)  union      ("n", child)  negation
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import ConfigError

Template = tuple

_A = ("e", 0)
STRUCTURES: dict[str, Template] = {
    "1p": ("p", 1, _A),
    "2p": ("p", 2, ("p", 1, _A)),
    "3p": ("p", 3, ("p", 2, ("p", 1, _A))),
    "2i": ("i", ("p", 1, _A), ("p", 3, ("e", 2))),
    "3i": ("i", ("p", 1, _A), ("p", 3, ("e", 2)), ("p", 5, ("e", 4))),
    "pi": ("i", ("p", 2, ("p", 1, _A)), ("p", 4, ("e", 3))),
    "ip": ("p", 4, ("i", ("p", 1, _A), ("p", 3, ("e", 2)))),
    "2u": ("u", ("p", 1, _A), ("p", 3, ("e", 2))),
    "up": ("p", 4, ("u", ("p", 1, _A), ("p", 3, ("e", 2)))),
    "2in": ("i", ("p", 1, _A), ("n", ("p", 3, ("e", 2)))),
    "3in": ("i", ("p", 1, _A), ("p", 3, ("e", 2)), ("n", ("p", 5, ("e", 4)))),
    "inp": ("p", 4, ("i", ("p", 1, _A), ("n", ("p", 3, ("e", 2))))),
    "pin": ("i", ("p", 2, ("p", 1, _A)), ("n", ("p", 4, ("e", 3)))),
    "pni": ("i", ("n", ("p", 2, ("p", 1, _A))), ("p", 4, ("e", 3))),
}
POSITIVE: tuple[str, ...] = ("1p", "2p", "3p", "2i", "3i", "pi", "ip", "2u", "up")
NEGATION: tuple[str, ...] = ("2in", "3in", "inp", "pin", "pni")


def check_structures(names: list[str] | tuple[str, ...]) -> list[str]:
    """Return `names` as a list, or raise ConfigError naming the unknown ones and the valid ones."""
    names = list(names)
    bad = [n for n in names if n not in STRUCTURES]
    if bad:
        raise ConfigError(f"unknown query structure(s) {bad}; valid: {', '.join(STRUCTURES)}")
    if not names:
        raise ConfigError(f"no query structure given; valid: {', '.join(STRUCTURES)}")
    return names


def slot_kinds(structure: str) -> list[str]:
    """'e' or 'r' for each slot of a query row of `structure`."""
    return list(_slot_kinds(check_structures([structure])[0]))


@functools.lru_cache(maxsize=None)
def _slot_kinds(structure: str) -> tuple[str, ...]:
    kinds: dict[int, str] = {}

    def walk(node: Template) -> None:
        if node[0] == "e":
            kinds[node[1]] = "e"
        elif node[0] == "p":
            kinds[node[1]] = "r"
            walk(node[2])
        else:
            for child in node[1:]:
                walk(child)

    walk(STRUCTURES[structure])
    return tuple(kinds[i] for i in range(len(kinds)))


def fold(template: Template, queries: torch.Tensor, *, anchor: Callable[[torch.Tensor], Any],
         project: Callable[[Any, torch.Tensor], Any], conj: Callable[[list], Any],
         disj: Callable[[list], Any], neg: Callable[[Any], Any]) -> Any:
    """Evaluate a template bottom-up on a batch of query rows with the given set operations."""
    kind = template[0]
    if kind == "e":
        return anchor(queries[:, template[1]])
    if kind == "p":
        sub = fold(template[2], queries, anchor=anchor, project=project, conj=conj, disj=disj, neg=neg)
        return project(sub, queries[:, template[1]])
    children = [fold(c, queries, anchor=anchor, project=project, conj=conj, disj=disj, neg=neg)
                for c in template[1:]]
    if kind == "i":
        return conj(children)
    if kind == "u":
        return disj(children)
    if kind == "n":
        return neg(children[0])
    raise ValueError(f"bad template node {template!r}")


def answers(structure: str, queries: torch.Tensor, adj: torch.Tensor, drop_negation: bool = False) -> torch.Tensor:
    """Exact answer sets (bool, B x N) of query rows on the graph `adj[r, h, t]` (bool or 0/1 float).

    `drop_negation` replaces every negated branch by "true" (the query without its negation),
    which query generation uses to keep only queries whose negation removes some answer.
    """
    n = adj.shape[1]
    if queries.dim() != 2 or queries.shape[1] != len(slot_kinds(structure)):
        raise ValueError(f"{structure} queries need {len(slot_kinds(structure))} slots, got shape "
                         f"{tuple(queries.shape)}")
    def anchor(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, n).bool()

    adj_f = adj if adj.is_floating_point() else adj.float()  # converted once, not per projection

    def project(sets: torch.Tensor, rels: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(sets)
        order = torch.argsort(rels, stable=True)  # rows grouped by relation: one matmul per relation
        rs, counts = torch.unique_consecutive(rels[order], return_counts=True)
        start = 0
        for r, c in zip(rs.tolist(), counts.tolist()):
            rows = order[start:start + c]
            out[rows] = (sets[rows].float() @ adj_f[r]) > 0
            start += c
        return out

    def conj(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts).all(0)

    def disj(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts).any(0)

    def neg(part: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(part) if drop_negation else ~part

    return fold(STRUCTURES[structure], queries, anchor=anchor, project=project, conj=conj, disj=disj, neg=neg)
