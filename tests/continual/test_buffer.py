"""Reservoir buffer: bounded, deterministic by seed, a uniform sample of the stream."""
import pytest
import torch

from unipeft.continual import ContinualError, ReservoirBuffer


def _fill(capacity: int, n: int, seed: int, batch: int = 10) -> ReservoirBuffer:
    buf = ReservoirBuffer(capacity, seed)
    for start in range(0, n, batch):
        ids = torch.arange(start, min(start + batch, n))
        buf.add((ids.float().unsqueeze(1),), ids, task_ids=start * 5 // n)
    return buf


def test_bounded_and_counts_seen():
    buf = _fill(capacity=50, n=1000, seed=0)
    assert len(buf) == 50 and buf.seen == 1000
    assert buf.all().inputs[0].shape == (50, 1)
    # Before the capacity is reached every example is kept, in order.
    small = _fill(capacity=50, n=30, seed=0)
    assert len(small) == 30 and small.all().labels.tolist() == list(range(30))


def test_deterministic_by_seed():
    a, b, c = _fill(40, 500, seed=3), _fill(40, 500, seed=3), _fill(40, 500, seed=4)
    assert torch.equal(a.all().labels, b.all().labels)
    assert not torch.equal(a.all().labels, c.all().labels)
    assert torch.equal(a.sample(16).labels, b.sample(16).labels)


def test_uniform_over_the_stream():
    # Every example of a 1,000-long stream ends up stored with probability 100/1000, whatever
    # its position: per tenth of the stream the inclusion rate is 0.1 (std ~0.0017 here).
    trials, n, cap = 200, 1000, 100
    hits = torch.zeros(n)
    for seed in range(trials):
        hits[_fill(cap, n, seed, batch=50).all().labels] += 1
    per_tenth = hits.view(10, 100).sum(dim=1) / (trials * 100)
    assert torch.all((per_tenth - 0.1).abs() < 0.01), per_tenth
    # Stored labels span the whole stream (a FIFO buffer would only hold the last 100).
    assert int((hits[:500] > 0).sum()) > 400


def test_sample_draws_distinct_examples_and_task_ids():
    buf = _fill(capacity=20, n=100, seed=1)
    s = buf.sample(8)
    assert len(s) == 8 and len(set(s.labels.tolist())) == 8
    # task ids travel with their examples (5 tasks of 20 consecutive labels)
    assert torch.equal(s.task_ids, s.labels // 20)
    assert len(buf.sample(500)) == 20


def test_logits_are_stored_with_examples():
    buf = ReservoirBuffer(5, seed=0)
    x = torch.randn(3, 4)
    buf.add((x,), torch.tensor([0, 1, 2]), 0, logits=x * 2)
    got = buf.all()
    assert buf.has_logits and torch.equal(got.logits, x * 2) and torch.equal(got.inputs[0], x)
    with pytest.raises(ContinualError, match="logits"):
        buf.add((x,), torch.tensor([0, 1, 2]), 0)


def test_bad_input():
    with pytest.raises(ContinualError, match="capacity"):
        ReservoirBuffer(0)
    with pytest.raises(ContinualError, match="empty"):
        ReservoirBuffer(3).sample(2)
