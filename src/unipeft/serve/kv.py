"""Per-sequence KV caches, packed into one batched transformers DynamicCache for a step and unpacked after.

A sequence's cache is one (keys, values) pair per layer, each of shape (heads, positions, head_dim):
its own positions only, no padding. A batch holds the rows left-padded to the longest, with one
exception: the first `extra` positions of every row (the virtual tokens a prompt or prefix adapter put
at the front of the cache) stay at the front, and the padding goes after them. That is the layout the
prompt methods build themselves ([virtual | padded real tokens]), so their masks (ones prepended for the
virtual positions) line up with the cache.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

SeqKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (heads, positions, head_dim) keys and values


def length(kv: SeqKV) -> int:
    """Positions held by one sequence's cache (virtual ones included)."""
    return int(kv[0][0].shape[1])


def pack(caches: list[SeqKV], extra: int = 0, new: int = 1) -> tuple[DynamicCache, list[int], torch.Tensor]:
    """One DynamicCache holding every row's cache, left-padded after the first `extra` positions; returns it,
    each row's padding and the attention mask of a step adding `new` tokens (over the real positions: a
    prompt method prepends the ones of its virtual tokens itself)."""
    lengths = [length(kv) for kv in caches]
    width = max(lengths)
    pads = [width - n for n in lengths]
    layers = []
    for layer in range(len(caches[0])):
        k0, v0 = caches[0][layer]
        keys = k0.new_zeros(len(caches), k0.shape[0], width, k0.shape[2])
        values = v0.new_zeros(len(caches), v0.shape[0], width, v0.shape[2])
        for row, (kv, pad) in enumerate(zip(caches, pads)):
            k, v = kv[layer]
            if extra:
                keys[row, :, :extra], values[row, :, :extra] = k[:, :extra], v[:, :extra]
            keys[row, :, extra + pad:], values[row, :, extra + pad:] = k[:, extra:], v[:, extra:]
        layers.append((keys, values))
    mask = (torch.arange(width - extra + new) >= torch.tensor(pads)[:, None]).long()
    return DynamicCache(layers), pads, mask


def unpack(cache: DynamicCache, pads: list[int], extra: int = 0) -> list[SeqKV]:
    """Each row's cache out of a batched one (its padding, after the first `extra` positions, dropped)."""
    rows: list[SeqKV] = [[] for _ in pads]
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        for row, pad in enumerate(pads):
            k, v = keys[row], values[row]
            if pad and extra:
                k = torch.cat((k[:, :extra], k[:, extra + pad:]), dim=1)
                v = torch.cat((v[:, :extra], v[:, extra + pad:]), dim=1)
            elif pad:
                k, v = k[:, pad:], v[:, pad:]
            rows[row].append((k, v))
    return rows


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompts left-padded to the longest; each row's
    positions count its own tokens from 0 (padding gets 0, it is masked)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
        positions[i, width - len(r):] = torch.arange(len(r))
    return ids, mask, positions


class Batch:
    """A group's running sequences with their caches packed into one DynamicCache, kept from step to step
    while the group's members stay the same (packing every step would copy every cache every step).

    Members are objects with a `cache` attribute (their own SeqKV while outside the batch, None inside).
    Call `fit` on every batch before `take` on any: sequences that moved to another group get their rows back.
    """

    def __init__(self, extra: int = 0) -> None:
        self.seqs: list = []
        self.cache: DynamicCache | None = None
        self.pads: list[int] = []
        self.extra = extra

    def fit(self, seqs: list) -> None:
        """Keep the rows of `seqs` if they are the members or a subset in the same order and every member left
        out has finished (its row is dropped); otherwise hand every live member its own cache back and empty
        the batch."""
        if not self.seqs or [id(s) for s in seqs] == [id(s) for s in self.seqs]:
            return
        where = {id(s): i for i, s in enumerate(self.seqs)}
        rows = [where.get(id(s)) for s in seqs]
        kept = {id(s) for s in seqs}
        finished = all(getattr(s, "done", False) for s in self.seqs if id(s) not in kept)
        if seqs and finished and None not in rows and rows == sorted(rows):
            return self._select(seqs, rows)
        for seq, row in zip(self.seqs, unpack(self.cache, self.pads, self.extra)):
            if not getattr(seq, "done", False):
                seq.cache = row
        self.clear()

    def take(self, seqs: list, new: int = 1) -> tuple[DynamicCache, torch.Tensor]:
        """(cache, attention mask of a step adding `new` tokens) for `seqs`, packing them if they are not
        the members already (their own caches move into the batch)."""
        if [id(s) for s in seqs] != [id(s) for s in self.seqs]:
            self.fit([])
            self.cache, self.pads, _ = pack([s.cache for s in seqs], self.extra, new)
            self.seqs = list(seqs)
            for seq in seqs:
                seq.cache = None
        width = self.cache.get_seq_length() - self.extra
        mask = (torch.arange(width + new) >= torch.tensor(self.pads)[:, None]).long()
        return self.cache, mask

    def keep(self, cache: DynamicCache) -> None:
        """The cache after the step (the members' rows, one position longer)."""
        self.cache = cache

    def clear(self) -> None:
        self.seqs, self.cache, self.pads = [], None, []

    def _select(self, seqs: list, rows: list[int]) -> None:
        """Only `rows` stay; padding that every remaining row has is cut."""
        pads = [self.pads[r] for r in rows]
        cut, extra = min(pads), self.extra
        index = torch.tensor(rows)
        layers = []
        for layer in self.cache.layers:
            k, v = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            if cut:
                k = torch.cat((k[:, :, :extra], k[:, :, extra + cut:]), dim=2)
                v = torch.cat((v[:, :, :extra], v[:, :, extra + cut:]), dim=2)
            layers.append((k, v))
        self.seqs, self.cache, self.pads = list(seqs), DynamicCache(layers), [p - cut for p in pads]
