"""Aggregation rules on hand-made client adapters, with the numbers each rule promises."""
import torch

from unipeft.federated.aggregate import fedavg, fedavg_exact, lora_fair, naive_gap

A, B = "s.lora_A.weight", "s.lora_B.weight"


def _client(seed: int, r: int = 4, rank: int | None = None, a=None):
    g = torch.Generator().manual_seed(seed)
    A_ = torch.randn(r, 12, generator=g) if a is None else a.clone()
    B_ = torch.randn(10, r, generator=g)
    if rank is not None:  # a product of rank `rank`: zero the other components
        B_[:, rank:] = 0
    return {A: A_, B: B_, "head.weight": torch.randn(3, 10, generator=g)}


def test_fedavg_is_the_example_weighted_mean():
    s = [_client(0), _client(1)]
    out = fedavg(s, [1, 3])
    for k in s[0]:
        assert torch.allclose(out[k], 0.25 * s[0][k] + 0.75 * s[1][k], atol=1e-6)


def test_naive_lora_average_is_not_the_mean_product_but_refactoring_is_when_rank_allows():
    s = [_client(0, rank=2), _client(1, rank=2)]  # mean product has rank <= 4 = r
    w = [2, 1]
    assert naive_gap(s, w, fedavg(s, w)) > 0.2
    exact, info = fedavg_exact(s, w)
    assert info["refactor_residual"] < 1e-6 and naive_gap(s, w, exact) < 1e-6
    assert torch.allclose(exact["head.weight"], fedavg(s, w)["head.weight"])


def test_refactoring_reports_what_truncation_lost():
    s = [_client(i) for i in range(3)]  # rank up to 12 > r = 4
    exact, info = fedavg_exact(s, [1, 1, 1])
    assert 0.05 < info["refactor_residual"] < 1
    assert abs(naive_gap(s, [1, 1, 1], exact) - info["refactor_residual"]) < 1e-6
    assert naive_gap(s, [1, 1, 1], exact) < naive_gap(s, [1, 1, 1], fedavg(s, [1, 1, 1]))


def test_ffa_lora_averaging_is_exact_with_a_shared_frozen_a():
    shared = torch.randn(4, 12)
    s = [_client(i, a=shared) for i in range(4)]
    assert naive_gap(s, [1, 2, 3, 4], fedavg(s, [1, 2, 3, 4])) < 1e-6


def test_lora_fair_keeps_mean_a_and_solves_for_b():
    s = [_client(i) for i in range(3)]
    w = [1, 1, 2]
    mean = fedavg(s, w)
    fair, info = lora_fair(s, w, lam=0.0)
    assert torch.equal(fair[A], mean[A])
    # the least-squares optimum over B: the residual is orthogonal to A's rows
    dw = sum(wi / 4 * (c[B].double() @ c[A].double()) for wi, c in zip(w, s))
    resid = dw - fair[B].double() @ fair[A].double()
    assert float((resid @ fair[A].double().T).abs().max()) < 1e-4
    assert info["fair_residual"] < naive_gap(s, w, mean) - 0.01
    ridge, _ = lora_fair(s, w, lam=10.0)  # a strong ridge keeps B near the plain mean
    assert (ridge[B] - mean[B]).norm() < (fair[B] - mean[B]).norm()
