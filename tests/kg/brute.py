"""Independent brute-force answers of every structure with Python sets, and a tiny hand-built graph."""
from __future__ import annotations

from unipeft.kg.datasets import from_triples

# 6 entities, 2 relations (plus reciprocals): a few chains, a fork and a shared target.
TINY_TRAIN = [("a", "r", "b"), ("b", "r", "c"), ("c", "s", "d"), ("a", "s", "c"), ("b", "s", "d"),
              ("d", "r", "e"), ("e", "r", "f"), ("a", "r", "e"), ("f", "s", "a")]
TINY_TEST = [("c", "r", "f"), ("b", "r", "d")]


def tiny_graph():
    """The hand-built graph as a KGDataset (ids in name order: a..f -> 0..5, r -> 0, s -> 1)."""
    return from_triples("tiny", {"train": TINY_TRAIN, "valid": [], "test": TINY_TEST})


def edge_list(data, *splits) -> set[tuple[int, int, int]]:
    """(h, r, t) id triples of `splits`, reciprocals (t, r + R, h) included."""
    out = set()
    for s in splits:
        for h, r, t in data.triples[s].tolist():
            out |= {(h, r, t), (t, r + data.n_relations, h)}
    return out


def brute_answers(structure: str, q: list[int], edges: set, n: int) -> set[int]:
    """The answer set of query row `q`, written out by hand per structure (BetaE's semantics)."""
    def p(src: set[int], rel: int) -> set[int]:
        return {t for h, r, t in edges if r == rel and h in src}

    everything = set(range(n))
    table = {
        "1p": lambda: p({q[0]}, q[1]),
        "2p": lambda: p(p({q[0]}, q[1]), q[2]),
        "3p": lambda: p(p(p({q[0]}, q[1]), q[2]), q[3]),
        "2i": lambda: p({q[0]}, q[1]) & p({q[2]}, q[3]),
        "3i": lambda: p({q[0]}, q[1]) & p({q[2]}, q[3]) & p({q[4]}, q[5]),
        "pi": lambda: p(p({q[0]}, q[1]), q[2]) & p({q[3]}, q[4]),
        "ip": lambda: p(p({q[0]}, q[1]) & p({q[2]}, q[3]), q[4]),
        "2u": lambda: p({q[0]}, q[1]) | p({q[2]}, q[3]),
        "up": lambda: p(p({q[0]}, q[1]) | p({q[2]}, q[3]), q[4]),
        "2in": lambda: p({q[0]}, q[1]) & (everything - p({q[2]}, q[3])),
        "3in": lambda: p({q[0]}, q[1]) & p({q[2]}, q[3]) & (everything - p({q[4]}, q[5])),
        "inp": lambda: p(p({q[0]}, q[1]) & (everything - p({q[2]}, q[3])), q[4]),
        "pin": lambda: p(p({q[0]}, q[1]), q[2]) & (everything - p({q[3]}, q[4])),
        "pni": lambda: (everything - p(p({q[0]}, q[1]), q[2])) & p({q[3]}, q[4]),
    }
    return table[structure]()
