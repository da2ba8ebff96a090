"""Every structure's exact answers equal an independent brute-force set computation."""
from __future__ import annotations

import pytest
import torch

from unipeft.core.errors import ConfigError
from unipeft.kg.structures import NEGATION, POSITIVE, STRUCTURES, answers, check_structures, slot_kinds

from .brute import brute_answers, edge_list, tiny_graph


def random_rows(structure: str, n_e: int, n_r: int, count: int, seed: int) -> torch.Tensor:
    """Seeded query rows of `structure` with entity/relation ids in range."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, n_e if k == "e" else n_r, (count,), generator=g) for k in slot_kinds(structure)]
    return torch.stack(cols, 1)


def test_the_fourteen_standard_structures():
    assert POSITIVE == ("1p", "2p", "3p", "2i", "3i", "pi", "ip", "2u", "up")
    assert NEGATION == ("2in", "3in", "inp", "pin", "pni")
    assert set(STRUCTURES) == set(POSITIVE) | set(NEGATION)
    assert slot_kinds("ip") == ["e", "r", "e", "r", "r"] and slot_kinds("pni") == ["e", "r", "r", "e", "r"]


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_answers_equal_brute_force_on_a_tiny_graph(structure):
    data = tiny_graph()
    adj = data.graph("train", "test")
    edges = edge_list(data, "train", "test")
    rows = random_rows(structure, data.n_entities, 2 * data.n_relations, 1000, seed=len(structure))
    got = answers(structure, rows, adj)
    nonempty = 0
    for row, mask in zip(rows.tolist(), got):
        want = brute_answers(structure, row, edges, data.n_entities)
        assert set(mask.nonzero().flatten().tolist()) == want, (structure, row)
        nonempty += bool(want)
    assert nonempty >= 10, f"{structure}: too few non-empty answer sets for the check to mean anything"


def test_drop_negation_answers_the_positive_part():
    data = tiny_graph()
    adj, edges = data.graph("train"), edge_list(data, "train")
    rows = random_rows("2in", data.n_entities, 2 * data.n_relations, 100, seed=3)
    got = answers("2in", rows, adj, drop_negation=True)
    for row, mask in zip(rows.tolist(), got):
        assert set(mask.nonzero().flatten().tolist()) == brute_answers("1p", row[:2], edges, data.n_entities)


def test_bad_structures_and_shapes_are_refused():
    with pytest.raises(ConfigError, match=r"unknown query structure\(s\) \['4p'\]; valid: 1p, 2p"):
        check_structures(["1p", "4p"])
    with pytest.raises(ConfigError, match="no query structure"):
        check_structures([])
    with pytest.raises(ValueError, match="2p queries need 3 slots"):
        answers("2p", torch.zeros(2, 2, dtype=torch.long), tiny_graph().graph("train"))
