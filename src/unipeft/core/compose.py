"""Composition blocks: a small algebra over loaded adapters, set with `model.set_adapter(block)`.

    Stack("a", "b")                 a, then b, at every site they share (the same as set_adapter(["a", "b"]))
    Split("a", "b", splits=[4])     the first 4 tokens through a, the rest through b (per site, along dim 1)
    Average("a", "b", weights=...)  base + sum_i w_i (site output with child i - base); weights sum to 1
    Parallel("a", "b")              the batch replicated once per child in one forward; output rows
                                    [0:B] come from a, [B:2B] from b
    BatchSplit("a", "b", batch_sizes=[2, 3])  rows 0-1 through a, rows 2-4 through b

Nesting (checked when the block is set, nothing changes on an error): Stack holds adapter names;
Split and Average hold names or Stacks; Parallel and BatchSplit hold names, Stacks, Splits or
Averages and only stand at the top. Every site evaluates a child with its own deltas through the
site's ordinary composition (input-, weight-, then output-side), so any method whose work happens
at its sites composes; adapters acting on the model's inputs (prompts, prefixes) and adapters
whose init edits the shared base weights are refused inside Split, Average, Parallel and
BatchSplit, and the row blocks need methods declaring mixed batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, MergeError


class Block:
    """A composition node: its children are adapter names or blocks."""

    inner: tuple[type, ...] = ()  # what a child may be (str = an adapter name); set below

    def __init__(self, *children) -> None:
        if not children:
            raise ConfigError(f"{type(self).__name__}: needs at least one adapter")
        for c in children:
            if not isinstance(c, self.inner):
                allowed = ", ".join("adapter names" if t is str else t.__name__ for t in self.inner)
                raise ConfigError(f"{type(self).__name__} cannot hold {_show(c)}: its children may be {allowed}")
        self.children = tuple(children)

    def leaves(self) -> list[str]:
        """Adapter names under this block, first appearance first."""
        out: list[str] = []
        for c in self.children:
            for n in ([c] if isinstance(c, str) else c.leaves()):
                if n not in out:
                    out.append(n)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


def _show(c) -> str:
    return f"{type(c).__name__}" if isinstance(c, Block) else repr(c)


class Stack(Block):
    """Children applied in order at every site they share."""

    inner = (str,)


class Split(Block):
    """Token ranges through different children: `splits` are the sizes of the first chunks along dim 1 (one
    per child; the last may be left out and takes the remaining tokens)."""

    inner = (str, Stack)

    def __init__(self, *children, splits: int | list[int]) -> None:
        super().__init__(*children)
        sizes = [splits] if isinstance(splits, int) else list(splits)
        if len(sizes) not in (len(children) - 1, len(children)) or len(children) < 2:
            raise ConfigError(f"Split.splits: expected {len(children) - 1} or {len(children)} chunk sizes for "
                              f"{len(children)} children (and at least 2 children), got {splits!r}")
        if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
            raise ConfigError(f"Split.splits: expected positive integers, got {splits!r}")
        self.splits = tuple(sizes)


class Average(Block):
    """The children's site outputs averaged: base + sum_i w_i (out_i - base). `weights` default to equal;
    with normalize_weights they are divided by their sum."""

    inner = (str, Stack)

    def __init__(self, *children, weights: list[float] | None = None, normalize_weights: bool = True) -> None:
        super().__init__(*children)
        w = [1.0] * len(children) if weights is None else list(weights)
        if len(w) != len(children) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                          or not math.isfinite(x) for x in w):
            raise ConfigError(f"Average.weights: expected {len(children)} finite numbers, got {weights!r}")
        if normalize_weights:
            if sum(w) == 0:
                raise ConfigError(f"Average.weights: they sum to 0, so they cannot be normalised: {weights!r}")
            w = [x / sum(w) for x in w]
        self.weights = tuple(float(x) for x in w)


class Parallel(Block):
    """The batch replicated once per child in one forward; the output stacks the replicas in child order."""

    inner = (str, Stack, Split, Average)


class BatchSplit(Block):
    """Consecutive rows through different children: `batch_sizes` rows each, summing to the batch."""

    inner = (str, Stack, Split, Average)

    def __init__(self, *children, batch_sizes: list[int]) -> None:
        super().__init__(*children)
        sizes = list(batch_sizes)
        if len(sizes) != len(children) or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0
                                              for s in sizes):
            raise ConfigError(f"BatchSplit.batch_sizes: expected {len(children)} positive integers (one per "
                              f"child), got {batch_sizes!r}")
        self.batch_sizes = tuple(sizes)


ROW_BLOCKS = (Parallel, BatchSplit)


def grouping(model, adapter_names: list[str]):
    """The Grouping of a mixed batch (`adapter_names`, one per row), after checking every named adapter can mix."""
    from . import edits
    from .registry import method_for_config
    from .site import BASE_NAME, Grouping

    if model.merged_adapters:
        raise MergeError("adapter_names cannot be used while adapters are merged; unmerge() first")
    for n in set(adapter_names):
        if n == BASE_NAME:
            continue
        model._check_name(n)
        spec = method_for_config(model.peft_config[n])
        if not spec.capabilities.mixed_batch:
            raise ConfigError(f"adapter '{n}' uses {spec.name}, which does not support mixed batches")
        edits.refuse_mixed(model._sites.values(), n)
    # The same names again (a server's decode steps) give the same Grouping object: sites key caches on it.
    key, last = tuple(adapter_names), model.__dict__.get("_last_grouping")
    if last is None or last[0] != key:
        last = model.__dict__["_last_grouping"] = (key, Grouping.build(list(adapter_names)))
    return last[1]


def check(model, block: Block) -> None:
    """ConfigError/MergeError if `block` cannot run on `model` (unknown names, refused methods, merges)."""
    from .registry import method_for_config

    if not isinstance(block, Block):
        raise ConfigError(f"set_adapter: expected an adapter name, a list of names or a composition block, "
                          f"got {type(block).__name__}")
    if model.merged_adapters:
        raise MergeError("composition blocks need unmerged adapters; unmerge() first")
    names = block.leaves()
    for n in names:
        model._check_name(n)
    if isinstance(block, Stack):
        return
    sites = list(model.sites())
    for n in names:
        spec = method_for_config(model.peft_config[n])
        if any(n in s.deltas and s.deltas[n].model_input for s in sites):
            raise ConfigError(f"{type(block).__name__}: adapter '{n}' ({spec.name}) acts on the model's inputs "
                              f"(virtual tokens), not at sites, so it cannot be split, averaged or replicated")
        edited = next((s.path for s in sites if n in s.edits.values), None)
        if edited is not None:
            raise ConfigError(f"{type(block).__name__}: adapter '{n}' edits the shared base weights of "
                              f"'{edited}' (its init leaves a residual there), so other branches would see it")
        if isinstance(block, ROW_BLOCKS) and not spec.capabilities.mixed_batch:
            raise ConfigError(f"{type(block).__name__}: adapter '{n}' uses {spec.name}, which does not support "
                              f"mixed batches")


@dataclass
class Rows:
    """Row ranges of a row block's children in this call (rows are consecutive per child)."""

    bounds: list[tuple[int, int]]
    batch: int


def forward_rows(model, block: Block, args: tuple, kwargs: dict):
    """Run the base model under a Parallel (inputs replicated) or BatchSplit (rows as given) block."""
    batch = _batch_size(args, kwargs)
    if isinstance(block, Parallel):
        if kwargs.get("past_key_values") is not None:
            raise ConfigError("Parallel replicates the batch, so it cannot continue a cache (generate): use "
                              "BatchSplit over a replicated batch instead")
        n = len(block.children)
        args = tuple(_repeat(a, batch, n) for a in args)
        kwargs = {k: _repeat(v, batch, n) for k, v in kwargs.items()}
        sizes = [batch] * n
    else:
        sizes = list(block.batch_sizes)
        if sum(sizes) != batch:
            raise ValueError(f"BatchSplit.batch_sizes sum to {sum(sizes)} but the batch has {batch} rows")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    model._ctx.rows = Rows([(a, a + s) for a, s in zip(starts, sizes)], sum(sizes))
    try:
        return model.base_model(*args, **kwargs)
    finally:
        model._ctx.rows = None


def _batch_size(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    first = next((t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None:
        raise ConfigError("a row block (Parallel, BatchSplit) needs a tensor input with a batch dimension")
    return first.shape[0]


def _repeat(value, batch: int, n: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(n, *([1] * (value.dim() - 1)))
    return value


def site_forward(site, block: Block, rows: Rows | None, x, *args, **kwargs):
    """One site's output under `block` (a row block's children each on their rows)."""
    if not isinstance(block, ROW_BLOCKS):
        return _evaluate(site, block, x, *args, **kwargs)
    if rows is None:
        raise ConfigError(f"{type(block).__name__} runs through the adapted model's forward, not a site alone")
    if x.shape[0] == 1 and rows.batch > 1:
        x = x.expand(rows.batch, *x.shape[1:])  # an input shared by every row (position ids)
    if x.shape[0] != rows.batch:
        raise ValueError(f"{type(block).__name__}: site '{site.path}' sees {x.shape[0]} rows, the block "
                         f"spans {rows.batch}")
    return torch.cat([_evaluate(site, c, x[a:b], *args, **kwargs) for c, (a, b) in zip(block.children, rows.bounds)])


def _evaluate(site, node, x, *args, **kwargs):
    if isinstance(node, str) or isinstance(node, Stack):
        names = [node] if isinstance(node, str) else node.children
        return site._compose([site.deltas[n] for n in names if n in site.deltas], x, *args, **kwargs)
    if isinstance(node, Average):
        base = site.base_layer(x, *args, **kwargs)
        out = base
        for w, c in zip(node.weights, node.children):
            out = out + w * (_evaluate(site, c, x, *args, **kwargs) - base)
        return out
    return _split(site, node, x, *args, **kwargs)


def _split(site, node: Split, x, *args, **kwargs):
    if x.dim() < 3 or args or kwargs:
        raise ValueError(f"Split at site '{site.path}': needs a (batch, tokens, ...) input and no other "
                         f"arguments, got shape {tuple(x.shape)}")
    length, sizes = x.shape[1], list(node.splits)
    if sum(sizes) > length or (len(sizes) == len(node.children) and sum(sizes) != length):
        raise ValueError(f"Split.splits {list(node.splits)} do not fit the {length} tokens at site '{site.path}'")
    if len(sizes) < len(node.children):
        sizes.append(length - sum(sizes))
    chunks = torch.split(x, sizes, dim=1)
    return torch.cat([_evaluate(site, c, h) for c, h in zip(node.children, chunks)], dim=1)
