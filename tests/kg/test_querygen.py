"""Query generation: deterministic by seed, hard answers really need a link missing from the easier graph."""
from __future__ import annotations

import pytest
import torch

from unipeft.core.errors import ConfigError
from unipeft.kg.querygen import default_max_answers, generate_queries, generate_split, query_stats
from unipeft.kg.structures import NEGATION, STRUCTURES, answers

from .brute import brute_answers, edge_list

COUNTS = {"n_train": 30, "n_valid": 10, "n_test": 30}


@pytest.fixture(scope="module")
def queries(umls):
    return generate_queries(umls, seed=7, **COUNTS)


def test_every_structure_and_split_is_generated(queries):
    stats = query_stats(queries)
    for split, n in (("train", 30), ("valid", 10), ("test", 30)):
        assert set(queries[split]) == set(STRUCTURES)
        for s, qs in queries[split].items():
            assert len(qs) == n, (split, s, stats[split][s])
            assert len({tuple(r) for r in qs.queries.tolist()}) == n  # distinct queries


def test_deterministic_by_seed(umls, queries):
    again = generate_queries(umls, seed=7, **COUNTS)
    other = generate_queries(umls, structures=["2p", "2in"], seed=8, **COUNTS)
    for split in queries:
        for s in STRUCTURES:
            a, b = queries[split][s], again[split][s]
            assert torch.equal(a.queries, b.queries) and torch.equal(a.answers, b.answers)
            assert torch.equal(a.hard, b.hard)
        for s in ("2p", "2in"):  # another seed gives other queries
            assert not torch.equal(queries[split][s].queries, other[split][s].queries)
    # A split/structure's stream does not depend on the other counts or structures asked for.
    alone = generate_split(umls, "test", "pi", 30, seed=7)
    assert torch.equal(alone.queries, queries["test"]["pi"].queries)


@pytest.mark.parametrize("split,full,easy", [("valid", ("train", "valid"), ("train",)),
                                             ("test", ("train", "valid", "test"), ("train", "valid"))])
def test_hard_answers_need_a_missing_link(umls, queries, split, full, easy):
    g_full, g_easy = umls.graph(*full), umls.graph(*easy)
    for s, qs in queries[split].items():
        on_full, on_easy = answers(s, qs.queries, g_full), answers(s, qs.queries, g_easy)
        assert torch.equal(qs.answers, on_full), s
        assert torch.equal(qs.hard, on_full & ~on_easy), s
        assert qs.hard.any(1).all(), f"{s}: a {split} query without hard answers"
        assert not (qs.hard & on_easy).any(), s
    # The same, independently with sets, on a few queries per structure.
    e_full, e_easy = edge_list(umls, *full), edge_list(umls, *easy)
    for s, qs in queries[split].items():
        for row, hard in zip(qs.queries[:3].tolist(), qs.hard[:3]):
            got = set(hard.nonzero().flatten().tolist())
            want = brute_answers(s, row, e_full, umls.n_entities) - brute_answers(s, row, e_easy, umls.n_entities)
            assert got == want and got, (s, row)
    # 1p: every hard answer is exactly a held-out triple, absent from the easier graph.
    qs = queries[split]["1p"]
    for (h, r), hard in zip(qs.queries.tolist(), qs.hard):
        for t in hard.nonzero().flatten().tolist():
            assert (h, r, t) in e_full and (h, r, t) not in e_easy


def test_training_queries_are_answered_on_the_training_graph(umls, queries):
    g = umls.graph("train")
    cap = default_max_answers(umls.n_entities)
    for s, qs in queries["train"].items():
        assert torch.equal(qs.answers, answers(s, qs.queries, g)) and torch.equal(qs.hard, qs.answers)
        sizes = qs.answers.sum(1)
        assert (sizes >= 1).all() and (sizes <= cap).all()


def test_negation_removes_some_answer(umls, queries):
    g = umls.graph("train", "valid", "test")
    for s in NEGATION:
        qs = queries["test"][s]
        without = answers(s, qs.queries, g, drop_negation=True)
        assert (without & ~qs.answers).any(1).all(), s


def test_bad_arguments(umls):
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        generate_split(umls, "dev", "1p", 5, 0)
    with pytest.raises(ConfigError, match="n must be >= 0"):
        generate_split(umls, "test", "1p", -1, 0)
    with pytest.raises(ConfigError, match="unknown query structure"):
        generate_queries(umls, structures=["1p", "5x"])
