"""Deterministic batch orders: shuffled, length-grouped, and split across processes/accumulation steps."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MEGA_BATCH = 50  # length grouping sorts windows of MEGA_BATCH batches (as transformers' LengthGroupedSampler)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch); the last partial batch is dropped.

    With `group_by_length`, each window of MEGA_BATCH shuffled batches is sorted by length
    (longest first) before cutting, so rows of a batch have similar lengths and padding is
    small; the batch order is then shuffled again.
    """
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = [int(i) for i in rng.permutation(n)]
    if group_by_length:
        window = batch_size * MEGA_BATCH
        perm = [i for start in range(0, n, window)
                for i in sorted(perm[start:start + window], key=lambda j: -lengths[j])]
    batches = [perm[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
    if group_by_length:
        batches = [batches[int(i)] for i in rng.permutation(len(batches))]
    return batches


def split_even(items: Sequence[int], parts: int) -> list[list[int]]:
    """Cut `items` into `parts` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def micro_batches(batch: Sequence[int], rank: int, world: int, accum: int) -> list[list[int]]:
    """This process's `accum` micro-batches of one global batch (world * accum contiguous chunks)."""
    chunks = split_even(batch, world * accum)
    return chunks[rank * accum:(rank + 1) * accum]


def eval_batches(lengths: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Sequential evaluation batches of this process's share, sorted by length to keep padding small."""
    mine = sorted(range(rank, len(lengths), world), key=lambda j: -lengths[j])
    return [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
