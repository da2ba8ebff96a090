"""The tensor merge operators: hand-computed small cases, and PEFT's merge utilities where PEFT has them."""
from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as mu

from unipeft.core.errors import ConfigError
from unipeft.merge import ops


def _sources(n: int = 3, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


WEIGHTS = [0.7, -0.4, 1.3]


def test_linear_by_hand_and_normalized():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0])
    assert torch.equal(ops.linear([a, b], [2.0, 0.5]), torch.tensor([3.5, 2.0]))
    assert torch.equal(ops.linear([a, b], [2.0, 0.5], normalize=True), torch.tensor([3.5, 2.0]) / 2.5)
    # a sum of weights of ~0 is not divided by
    assert torch.equal(ops.linear([a, b], [1.0, -1.0], normalize=True), torch.tensor([-2.0, 6.0]))


def test_trim_mask_keeps_int_density_times_numel_largest():
    t = torch.tensor([3.0, -1.0, 2.0, -4.0, 0.5])
    assert torch.equal(ops.trim_mask(t, 0.4), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))  # k = 2
    assert torch.equal(ops.trim_mask(t, 0.59), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))  # int(2.95) = 2
    assert torch.equal(ops.trim_mask(t, 0.6), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))  # k = 3
    assert torch.equal(ops.trim_mask(t, 0.1), torch.zeros(5))  # k = 0 keeps nothing (PEFT's rule)
    assert torch.equal(ops.trim_mask(t, 0.1, at_least_one=True), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(ops.trim_mask(t, 1.0), torch.ones(5))


def test_elect_sign_total_and_frequency_differ_by_hand():
    ts = [torch.tensor([5.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([-1.0, 0.0])]
    assert torch.equal(ops.elect_sign(ts, "total"), torch.tensor([1.0, 1.0]))       # 5-1-1 > 0; tie -> +1
    assert torch.equal(ops.elect_sign(ts, "frequency"), torch.tensor([-1.0, 1.0]))  # two of three negative
    with pytest.raises(ConfigError, match="majority_sign_method"):
        ops.elect_sign(ts, "mean")


def test_ties_by_hand_for_both_divisors():
    # density 1: no trimming. Entry 0: values 2, -1, 4 (weights 1, 1, 0.5) -> total sign +, agreeing 2 and 4.
    ts = [torch.tensor([2.0, -3.0]), torch.tensor([-1.0, 1.0]), torch.tensor([4.0, -1.0])]
    w = [1.0, 1.0, 0.5]
    # count: (1*2 + 0.5*4) / 2 = 2;   entry 1: sign -, agreeing -3 (w 1) and -1 (w .5): (-3 - .5) / 2
    assert torch.allclose(ops.ties(ts, w, 1.0, divisor="count"), torch.tensor([2.0, -1.75]), atol=0, rtol=0)
    # weights: sign from weighted values (2, -1, 2 -> +); (2 + 2) / (1 + .5); entry 1: (-3 - .5) / 1.5
    assert torch.allclose(ops.ties(ts, w, 1.0, divisor="weights"), torch.tensor([4 / 1.5, -3.5 / 1.5]), atol=1e-7)
    # A negative weight: count elects on the raw values (2 + 3 - .5 > 0: a and b agree, (2 - 3) / 2);
    # weights elects on the weighted ones (2 - 3 - 1 < 0: b and c agree, (-3 - 1) / (-1 + 2)).
    ts, w = [torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([-0.5])], [1.0, -1.0, 2.0]
    assert torch.equal(ops.ties(ts, w, 1.0, divisor="count"), torch.tensor([-0.5]))
    assert torch.equal(ops.ties(ts, w, 1.0, divisor="weights"), torch.tensor([-4.0]))


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_magnitude_linear_equal_peft(sign, density):
    ts, w = _sources(), torch.tensor(WEIGHTS)
    assert torch.equal(ops.ties(ts, WEIGHTS, density, sign), mu.ties(ts, w, density, sign))
    assert torch.equal(ops.magnitude_prune(ts, WEIGHTS, density), mu.magnitude_prune(ts, w, density))
    assert torch.equal(ops.linear(ts, WEIGHTS), mu.task_arithmetic(ts, w))


def test_dare_mask_is_one_bernoulli_draw_per_source():
    t = torch.randn(4, 7)
    mask = ops.dare_mask(t, 0.3, torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    assert torch.equal(mask, torch.bernoulli(torch.full_like(t, 0.3)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    assert torch.equal(ops.dare_mask(t, 1.0, g), torch.ones_like(t))
    assert torch.equal(g.get_state(), state)  # density 1 draws nothing


@pytest.mark.parametrize("seed", [0, 7])
def test_dare_equals_peft_with_the_same_seed(seed):
    ts, w = _sources(), torch.tensor(WEIGHTS)
    torch.manual_seed(seed)
    ref = mu.dare_linear(ts, w, 0.4)
    assert torch.equal(ops.dare_linear(ts, WEIGHTS, 0.4, torch.Generator().manual_seed(seed)), ref)
    torch.manual_seed(seed)
    ref = mu.dare_ties(ts, w, 0.4, "frequency")
    got = ops.dare_ties(ts, WEIGHTS, 0.4, torch.Generator().manual_seed(seed), "frequency")
    assert torch.equal(got, ref)
    torch.manual_seed(seed)  # no generator: the global RNG, drawn exactly as PEFT draws
    ours = ops.dare_ties(ts, WEIGHTS, 0.4)
    torch.manual_seed(seed)
    assert torch.equal(ours, mu.dare_ties(ts, w, 0.4))


def test_dare_without_rescale_keeps_kept_values():
    t = torch.arange(1.0, 11.0)
    out = ops.dare_linear([t], [1.0], 0.5, torch.Generator().manual_seed(1), rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], t[kept]) and 0 < kept.sum() < 10
    scaled = ops.dare_linear([t], [1.0], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(scaled, out / 0.5)


def _pcb_reference(rows: list[list[float]], weights, ratio, low, high) -> list[float]:
    """PCB written entry by entry with sorted lists (no tensor ops), for the test only."""
    n, d = len(rows), len(rows[0])

    def clip(row, lo_r, hi_r):
        s = sorted(row)
        lo, hi = s[int(d * lo_r)], s[max(0, int(d * (1 - hi_r) - 1))]
        return [min(max(v, lo), hi) for v in row]

    def minmax(row):
        lo, hi = min(row), max(row)
        return [(v - lo) / max(hi - lo, 1e-12) for v in row]

    mags = [clip([abs(v) for v in r], low, high) for r in rows]
    col = [sum(r[j] for r in rows) for j in range(d)]
    scores = []
    for i in range(n):
        intra = [math.exp(n * v * v) for v in minmax(mags[i])]
        inter = [math.tanh(rows[i][j] * col[j]) for j in range(d)]
        scores.append(minmax(clip([a * b for a, b in zip(intra, inter)], 1 - ratio, 0.0)))
    out = []
    for j in range(d):
        num = sum(weights[i] * scores[i][j] * math.copysign(mags[i][j], rows[i][j]) for i in range(n))
        out.append(num / max(sum(scores[i][j] for i in range(n)), 1e-12))
    return out


@pytest.mark.parametrize("ratio,low,high", [(0.5, 0.0, 0.0), (0.3, 0.1, 0.1), (1.0, 1e-4, 1e-4)])
def test_pcb_matches_an_entrywise_reference(ratio, low, high):
    ts = _sources(3, (4, 5), seed=2)
    w = [1.0, 0.5, 2.0]
    got = ops.pcb(ts, w, ratio, low, high)
    ref = torch.tensor(_pcb_reference([t.reshape(-1).tolist() for t in ts], w, ratio, low, high)).reshape(4, 5)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-6)


def test_pcb_drops_the_low_scored_fraction():
    ts = _sources(2, (10,), seed=3)
    got = ops.pcb(ts, [1.0, 1.0], 0.2, 0.0, 0.0)
    # each row keeps at most 2 of 10 entries (its top 20% scores); an entry both rows drop is 0
    assert int((got != 0).sum()) <= 4


def test_svd_truncate_full_rank_exact_and_best_rank_k():
    d = _sources(1, (6, 4), seed=5)[0]
    b, a = ops.svd_truncate(d, 4)
    assert b.shape == (6, 4) and a.shape == (4, 4) and torch.allclose(b @ a, d, atol=1e-5)
    s = torch.linalg.svdvals(d)
    b1, a1 = ops.svd_truncate(d, 2)
    # Eckart-Young: the residual of the best rank-2 approximation is the norm of the dropped values
    assert math.isclose(torch.linalg.norm(d - b1 @ a1).item(), torch.linalg.norm(s[2:]).item(), rel_tol=1e-5)
    assert torch.allclose(a1 @ a1.T, torch.eye(2), atol=1e-5)  # A has orthonormal rows, B = U S
    b8, a8 = ops.svd_truncate(d, 8)  # above min(out, in): zero padding
    assert b8.shape == (6, 8) and a8.shape == (8, 4) and torch.equal(b8[:, 4:], torch.zeros(6, 4))
    assert torch.allclose(b8 @ a8, d, atol=1e-5)


def test_svd_truncate_clamp_is_the_quantile_of_both_factors():
    d = _sources(1, (6, 4), seed=6)[0]
    b0, a0 = ops.svd_truncate(d, 3)
    h = torch.quantile(torch.cat([b0.flatten(), a0.flatten()]), 0.8)
    b, a = ops.svd_truncate(d, 3, clamp=0.8)
    assert torch.equal(b, b0.clamp(-h, h)) and torch.equal(a, a0.clamp(-h, h))
    assert not torch.equal(b, b0)


def test_slerp_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    half = ops.slerp(a, b, 0.5)
    # angle 90 degrees between the directions: sin(45)/sin(90) of each original vector
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]), atol=1e-7)
    assert torch.allclose(ops.slerp(a, b, 0.0), a) and torch.allclose(ops.slerp(a, b, 1.0), b)
    c = torch.tensor([2.0, 0.0001])  # nearly colinear with a: linear interpolation
    assert torch.equal(ops.slerp(a, c, 0.25), 0.75 * a + 0.25 * c)
    rows_a, rows_b = torch.stack([a, a]), torch.stack([b, 3 * a])
    per_row = ops.slerp(rows_a, rows_b, 0.5, rowwise=True)
    assert torch.allclose(per_row[0], half, atol=1e-7) and torch.allclose(per_row[1], 0.5 * a + 1.5 * a)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8])
def test_slerp_equals_mergekit(t):
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a, b = _sources(2, (4, 6), seed=8)
    b[1] = 2 * a[1]  # a colinear row takes the linear branch
    ref = mergekit_slerp(torch.tensor(t), a, b)  # one angle per output row
    assert torch.allclose(ops.slerp(a, b, t, rowwise=True), ref, atol=1e-6, rtol=0)
    flat = mergekit_slerp(torch.tensor(t), a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
    assert torch.allclose(ops.slerp(a, b, t), flat, atol=1e-6, rtol=0)  # one angle for the whole tensor


@pytest.mark.parametrize("call,field", [
    (lambda ts: ops.linear(ts, [1.0]), "weights"),
    (lambda ts: ops.linear([ts[0], torch.zeros(2)], [1.0, 1.0]), r"tensors\[1\]"),
    (lambda ts: ops.ties(ts, [1.0, 1.0], 0.0), "density"),
    (lambda ts: ops.dare_linear(ts, [1.0, 1.0], 1.5), "density"),
    (lambda ts: ops.pcb(ts, [1.0, 1.0], 0.0), "ratio"),
    (lambda ts: ops.ties(ts, [1.0, 1.0], 0.5, divisor="mean"), "divisor"),
    (lambda ts: ops.svd_truncate(ts[0].reshape(-1), 2), "delta_2d"),
])
def test_bad_arguments_raise_config_errors(call, field):
    with pytest.raises(ConfigError, match=field):
        call(_sources(2, (3, 3)))
