"""Filtered ranking metrics, checked on hand-worked examples."""
from __future__ import annotations

import math

import torch

from unipeft.kg.evaluate import hard_answer_ranks, query_metrics, summarize
from unipeft.kg.link import filtered_ranks, ranking_metrics


def test_filtered_rank_of_a_triple_by_hand():
    # 6 candidate tails; the target is entity 2 (score 0.7). Entities 0 (0.9) and 4 (0.8) score
    # higher, but 4 is another known answer and is filtered out; entity 5 ties with the target.
    scores = torch.tensor([[0.9, 0.1, 0.7, 0.3, 0.8, 0.7]])
    known = torch.tensor([[False, False, True, False, True, False]])
    rank = filtered_ranks(scores, torch.tensor([2]), known)
    assert rank.tolist() == [2.5]  # 1 + one better (entity 0) + half a tie (entity 5)
    raw = filtered_ranks(scores, torch.tensor([2]), torch.zeros_like(known))
    assert raw.tolist() == [3.5]   # unfiltered: entity 4 counts too
    m = ranking_metrics(torch.tensor([1.0, 2.5, 4.0, 20.0]))
    assert math.isclose(m["mrr"], (1 + 1 / 2.5 + 1 / 4 + 1 / 20) / 4)
    assert (m["hits@1"], m["hits@3"], m["hits@10"]) == (0.25, 0.5, 0.75)


def test_query_metrics_on_hard_answers_by_hand():
    # Query 0: answers {0 easy, 1 hard, 3 hard}; query 1: answers {4 hard}; N = 5.
    scores = torch.tensor([[5.0, 4.0, 3.0, 1.0, 2.0],
                           [1.0, 2.0, 3.0, 4.0, 0.5]])
    answers = torch.tensor([[True, True, False, True, False], [False, False, False, False, True]])
    hard = torch.tensor([[False, True, False, True, False], [False, False, False, False, True]])
    ranks = hard_answer_ranks(scores, answers, hard)
    # q0: entity 1 (4.0) is beaten by no non-answer -> 1; entity 3 (1.0) is beaten by 2 (3.0) and 4 (2.0) -> 3.
    # q1: entity 4 (0.5) is beaten by all four others -> 5.
    assert ranks[0, 1] == 1 and ranks[0, 3] == 3 and ranks[1, 4] == 5
    assert torch.isnan(ranks[0, 0]) and torch.isnan(ranks[1, 0])
    m = query_metrics(scores, answers, hard)
    assert math.isclose(m["mrr"], ((1 + 1 / 3) / 2 + 1 / 5) / 2)
    assert math.isclose(m["hits@1"], (0.5 + 0) / 2) and math.isclose(m["hits@3"], (1 + 0) / 2)
    assert m["hits@10"] == 1.0 and m["queries"] == 2


def test_ties_count_half_and_constant_scores_rank_mid_field():
    scores = torch.zeros(1, 11)
    answers = torch.zeros(1, 11, dtype=torch.bool)
    answers[0, 3] = True
    ranks = hard_answer_ranks(scores, answers, answers)
    assert ranks[0, 3] == 6.0  # 1 + 10 ties / 2


def test_summary_averages_by_family():
    per = {"1p": {"mrr": 0.5}, "2p": {"mrr": 0.3}, "2in": {"mrr": 0.1}}
    assert summarize(per) == {"avg_mrr": 0.3, "avg_mrr_positive": 0.4, "avg_mrr_negation": 0.1}
