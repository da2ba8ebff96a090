"""kv.Batch: a group's caches stay packed between steps; finished rows leave, moved rows get their cache back."""
from __future__ import annotations

import torch

from unipeft.serve import kv


class Seq:
    def __init__(self, n: int, seed: int, extra: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cache = [(torch.randn(2, extra + n, 4, generator=g), torch.randn(2, extra + n, 4, generator=g))
                      for _ in range(3)]
        self.own = [(k.clone(), v.clone()) for k, v in self.cache]
        self.done = False


def rows(batch: kv.Batch) -> list:
    return kv.unpack(batch.cache, batch.pads, batch.extra)


def same(a, b) -> bool:
    return all(torch.equal(k1, k2) and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(a, b))


def test_members_stay_packed_and_finished_rows_leave_with_their_padding():
    for extra in (0, 2):
        seqs = [Seq(5, 0, extra), Seq(2, 1, extra), Seq(3, 2, extra)]
        batch = kv.Batch(extra)
        cache, mask = batch.take(seqs)
        assert all(s.cache is None for s in seqs) and batch.pads == [0, 3, 2]
        assert mask.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
        assert batch.take(seqs)[0] is cache  # same members: nothing is re-packed
        assert all(same(r, s.own) for r, s in zip(rows(batch), seqs))
        seqs[0].done = True  # the longest row finishes: the others keep theirs, the common padding goes
        batch.fit(seqs[1:])
        assert batch.pads == [1, 0] and batch.cache.get_seq_length() == extra + 3
        assert all(same(r, s.own) for r, s in zip(rows(batch), seqs[1:]))
        assert batch.take(seqs[1:])[1].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


def test_a_member_that_moves_or_a_newcomer_gets_every_live_row_back_first():
    a, b, c = Seq(4, 3), Seq(2, 4), Seq(3, 5)
    batch = kv.Batch()
    batch.take([a, b])
    batch.fit([a])  # b is not finished: it moved to another group, so it needs its own cache back
    assert batch.seqs == [] and same(a.cache, a.own) and same(b.cache, b.own)
    batch.take([a, b])
    batch.fit([a, b, c])  # a newcomer: re-packed from the members' own caches
    assert same(a.cache, a.own) and same(b.cache, b.own)
    batch.take([a, b, c])
    assert all(same(r, s.own) for r, s in zip(rows(batch), (a, b, c)))
