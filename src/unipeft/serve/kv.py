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
