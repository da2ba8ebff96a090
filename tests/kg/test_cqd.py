"""CQD beam search with t-norms: exact on a perfect scorer, and equal to exhaustive optimisation."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from unipeft.core.errors import ConfigError
from unipeft.kg.cqd import CQDConfig, answer_in_chunks, answer_queries, t_conorm, t_norm
from unipeft.kg.structures import STRUCTURES

from .brute import brute_answers, edge_list, tiny_graph
from .test_structures import random_rows


class TableScorer(nn.Module):
    """Scores read from a fixed table logits[r, h, t]: a hand-set link predictor."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 1], x[:, 0]]


def perfect_scorer(adj: torch.Tensor) -> TableScorer:
    """+40 on every edge of the graph, -40 elsewhere: sigmoid gives 1 or ~4e-18."""
    return TableScorer(adj.double() * 80 - 40)


@pytest.mark.parametrize("tnorm", ["prod", "min"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_perfect_scorer_answers_equal_brute_force(structure, tnorm):
    data = tiny_graph()
    adj = data.graph("train")
    edges = edge_list(data, "train")
    rows = random_rows(structure, data.n_entities, 2 * data.n_relations, 1500, seed=11)
    truth = answer_in_chunks(perfect_scorer(adj), structure, rows, data.n_entities, CQDConfig(tnorm=tnorm), chunk=64)
    assert ((truth > 0.999) | (truth < 1e-6)).all(), "a perfect scorer gives crisp truth degrees"
    nonempty = 0
    for row, t in zip(rows.tolist(), truth):
        want = brute_answers(structure, row, edges, data.n_entities)
        assert set((t > 0.5).nonzero().flatten().tolist()) == want, (structure, tnorm, row)
        nonempty += bool(want)
    assert nonempty >= 5


def _random_scorer(n_r: int, n: int, seed: int) -> TableScorer:
    g = torch.Generator().manual_seed(seed)
    return TableScorer(torch.randn(n_r, n, n, generator=g, dtype=torch.float64) * 2)


@pytest.mark.parametrize("tnorm", ["prod", "min"])
def test_beam_search_equals_exhaustive_optimisation_over_variables(tnorm):
    """With fuzzy scores, 2p/ip/pin answers equal max over every variable assignment of the t-norm."""
    n, n_r = 5, 3
    model = _random_scorer(n_r, n, seed=4)
    p = torch.sigmoid(model.logits)  # p[r, h, t]
    T = (lambda a, b: a * b) if tnorm == "prod" else torch.minimum
    cfg = CQDConfig(tnorm=tnorm)
    for a, r1, r2 in itertools.product(range(n), range(n_r), range(n_r)):
        got = answer_queries(model, "2p", torch.tensor([[a, r1, r2]]), n, cfg)[0]
        want = torch.stack([T(p[r1, a, v], p[r2, v]) for v in range(n)]).max(0).values
        torch.testing.assert_close(got, want)
    for a, r1, b, r2, r3 in [(0, 1, 2, 0, 2), (4, 2, 4, 1, 0), (1, 0, 3, 2, 1)]:
        got = answer_queries(model, "ip", torch.tensor([[a, r1, b, r2, r3]]), n, cfg)[0]
        want = torch.stack([T(T(p[r1, a, v], p[r2, b, v]), p[r3, v]) for v in range(n)]).max(0).values
        torch.testing.assert_close(got, want)
        got = answer_queries(model, "pin", torch.tensor([[a, r1, r2, b, r3]]), n, cfg)[0]
        two_hop = torch.stack([T(p[r1, a, v], p[r2, v]) for v in range(n)]).max(0).values
        torch.testing.assert_close(got, T(two_hop, 1 - p[r3, b]))


def test_full_beam_equals_no_beam_and_a_narrow_beam_is_an_approximation():
    model = _random_scorer(4, 8, seed=5)
    rows = random_rows("3p", 8, 4, 50, seed=1)
    exact = answer_queries(model, "3p", rows, 8, CQDConfig(beam=None))
    assert torch.equal(answer_queries(model, "3p", rows, 8, CQDConfig(beam=8)), exact)
    narrow = answer_queries(model, "3p", rows, 8, CQDConfig(beam=2))
    assert (narrow <= exact + 1e-12).all() and (narrow < exact - 1e-6).any()


def test_t_norms_and_conorms():
    a, b = torch.tensor([0.2, 0.9]), torch.tensor([0.5, 0.4])
    torch.testing.assert_close(t_norm([a, b], "prod"), torch.tensor([0.1, 0.36]))
    torch.testing.assert_close(t_norm([a, b], "min"), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(t_conorm([a, b], "prod"), torch.tensor([0.6, 0.94]))
    torch.testing.assert_close(t_conorm([a, b], "min"), torch.tensor([0.5, 0.9]))


def test_bad_config():
    with pytest.raises(ConfigError, match="tnorm.*'lukasiewicz'"):
        CQDConfig(tnorm="lukasiewicz")
    with pytest.raises(ConfigError, match="beam"):
        CQDConfig(beam=0)
