"""Base-weight edits of inits (PiSSA's residual W - s B0 A0, KaSA's truncation): owned by the adapter
that made them and held in the base layer only while that adapter is active.

Each adapter's edit is the exact value it wants a parameter to hold, computed from the original
weight. The layer holds the original when no editing adapter is active (disabled, unload, delete),
that adapter's exact value when one is, and original + the sum of the active adapters' changes
when several are (their changes add, like their deltas; dense weights only). So a saved adapter
gives the same outputs whatever else the model holds, and `disable_adapters` is the true base.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import layers
from .errors import ConfigError, MergeError


class BaseEdits:
    """The edits adapters made to one base layer's parameters, and which of them it holds now."""

    def __init__(self, layer: nn.Module, path: str) -> None:
        self.layer, self.path = layer, path
        self.original: dict[str, tuple] = {}  # param -> exact snapshot of the unedited value
        self.values: dict[str, dict[str, tuple]] = {}  # adapter -> param -> exact snapshot of its value
        self.applied: tuple[str, ...] = ()  # the adapters whose edits the layer holds, in active order

    def __bool__(self) -> bool:
        return bool(self.values)

    def owners(self) -> list[str]:
        """Adapters that edited this layer."""
        return list(self.values)

    def add(self, name: str, edits: dict[str, torch.Tensor]) -> None:
        """Record adapter `name`'s wanted values (stored layout); the layer is not changed (see `sync`)."""
        layer = self.layer
        for k in edits:
            self.original.setdefault(k, layers.snapshot_param(layer, k))
        held = {k: layers.snapshot_param(layer, k) for k in edits}
        values = {}
        for k, v in edits.items():  # the exact stored form (requantized when packed), then put back
            layers.write_param(layer, k, v)
            values[k] = layers.snapshot_param(layer, k)
            layers.restore_param(layer, k, held[k])
        self.values[name] = values

    def wanted(self, active: Sequence[str]) -> tuple[str, ...]:
        """The editing adapters among `active`, in order."""
        return tuple(n for n in active if n in self.values)

    def check(self, active: Sequence[str], merged: bool) -> None:
        """The error `sync(active)` would raise, raised before anything changes."""
        want = self.wanted(active)
        if want == self.applied:
            return
        if merged:
            raise MergeError(f"'{self.path}' holds merged adapters and base-weight edits of {list(self.values)}; "
                             f"unmerge() before changing which of them are active")
        shared = [k for k in self.original if sum(k in self.values[n] for n in want) > 1]
        packed = [k for k in shared if self.original[k][0] == "packed"]
        if packed:
            raise ConfigError(f"adapters {list(want)} all edit the quantized weight of '{self.path}' (e.g. by a "
                              f"PiSSA-style init); a 4/8-bit weight can hold only one such edit: activate one of them")

    def sync(self, active: Sequence[str], merged: bool = False) -> None:
        """Make the layer hold the edits of the editing adapters among `active` (none: the original)."""
        self.check(active, merged)
        want = self.wanted(active)
        if want == self.applied:
            return
        layer = self.layer
        for k, original in self.original.items():
            owners = [n for n in want if k in self.values[n]]
            if not owners:
                layers.restore_param(layer, k, original)
            elif len(owners) == 1:
                layers.restore_param(layer, k, self.values[owners[0]][k])
            else:
                base = original[1]
                total = base.clone()
                for n in owners:
                    total += self.values[n][k][1] - base
                layers.write_param(layer, k, total)
        self.applied = want

    def remove(self, name: str, active: Sequence[str], merged: bool = False) -> None:
        """Forget adapter `name`'s edits; the layer then holds those of the rest of `active`."""
        if name not in self.values:
            return
        self.sync([n for n in active if n != name], merged)
        del self.values[name]
        self.applied = tuple(n for n in self.applied if n != name)
        for k in [k for k in self.original if not any(k in v for v in self.values.values())]:
            del self.original[k]

    def clear(self) -> None:
        """Give the layer its original parameters back and forget every edit."""
        self.sync([])
        self.values.clear()
        self.original.clear()


def sync_sites(sites, active: Sequence[str]) -> None:
    """Every site's edits follow `active`; every check runs before the first write."""
    edited = [s for s in sites if s.edits]
    for site in edited:
        site.edits.check(active, bool(site.merged))
    for site in edited:
        site.edits.sync(active, bool(site.merged))


def refuse_mixed(sites, name: str) -> None:
    """ConfigError when adapter `name` edits some base weight: rows of one batch share the base weights."""
    path = next((s.path for s in sites if name in s.edits.values), None)
    if path is not None:
        raise ConfigError(f"adapter '{name}' edits the base weights of '{path}' (its init leaves a residual "
                          f"there); rows of one batch share the base weights, so it cannot be mixed per row "
                          f"(adapter_names): run it with set_adapter")
