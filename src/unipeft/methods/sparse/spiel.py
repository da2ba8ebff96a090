"""SpIEL-style sparse fine-tuning: a fixed-size index set per matrix, pruned and regrown during training.

Each target matrix starts with `density` of its entries chosen at random (seeded per module).
Every `update_every` steps until `updates_until` of the run, the `drop_fraction` of entries
whose values moved least are dropped and as many new entries are grown where the dense
gradient of that step is largest (SpIEL's accumulated-gradient growth, estimated on one step).
The dense gradient is never stored: it is computed in row blocks during that step's backward
and only the best candidates are kept. Kept entries keep their values and optimizer moments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import positive_int, unit_ratio
from ...core.registry import Capabilities, register
from ...core.hooks import TrainContext, TrainerCallback
from .base import (CHUNK_ELEMENTS, SPARSE_LAYERS, SparseDelta, count_for, load_selection_state,
                      path_seed, selection_state, sparse_deltas)


@dataclass
class SpielConfig(AdapterConfig):
    """SpIEL: `density` of each target matrix trains; the index set is pruned and regrown every `update_every` steps."""

    peft_type = "SPIEL"

    density: float = unit_ratio(0.01, "density")
    update_every: int = positive_int(20)
    drop_fraction: float = unit_ratio(0.2, "drop_fraction")
    updates_until: float = unit_ratio(0.75, "updates_until")
    seed: int = 0

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """Prune-and-regrow on the update steps."""
        return [SpielCallback(model, adapter_name, self)]


class SpielDelta(SparseDelta):
    """Random initial index set of `density` entries; saved as `<path>.spiel_values/_indices`."""

    prefix = "spiel"

    def __init__(self, base: nn.Module, config: SpielConfig, path: str, bank=None) -> None:
        w = layers.dense_weight(base) if isinstance(base, SPARSE_LAYERS) else torch.zeros(1, 1)
        k = count_for(config.density, w.numel())
        g = torch.Generator().manual_seed(path_seed(config.seed, path))
        init = torch.randperm(w.numel(), generator=g)[:k]
        super().__init__(base, config, path, bank, k=k, init_indices=init)
        self.candidates: tuple[torch.Tensor, torch.Tensor] | None = None  # (scores, flat) of this step

    def probe(self, n: int) -> None:
        """During the next backward, keep the `n` unselected entries of largest |dense gradient|."""
        layout = self.layout()
        selected = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.indices.device)
        selected[self.indices] = True
        self.candidates = None

        def collect(g2: torch.Tensor, x2: torch.Tensor) -> None:
            rows = max(1, CHUNK_ELEMENTS // max(1, self.in_features))
            best_s, best_i = [], []
            if self.candidates is not None:
                best_s.append(self.candidates[0])
                best_i.append(self.candidates[1])
            with torch.no_grad():
                for r0 in range(0, self.out_features, rows):
                    block = (g2[:, r0:r0 + rows].T @ x2).abs().flatten()  # rows x in, freed after the block
                    base = r0 * self.in_features
                    block[selected[base:base + block.numel()]] = -1.0
                    s, i = torch.topk(block, min(n, block.numel()))
                    best_s.append(s)
                    best_i.append(i + base)
                s, i = torch.cat(best_s), torch.cat(best_i)
                # several micro-batches: keep each entry's best score, then the overall best n
                order = torch.argsort(s, descending=True)
                s, i = s[order], i[order]
                uniq, first = _first_occurrence(i)
                s, i = s[first], uniq
                top = torch.topk(s, min(n, s.numel()))
                self.candidates = (top.values, i[top.indices])

        layout.on_backward = collect

    def regrow(self, n: int, optimizer=None) -> int:
        """Drop the n entries with the smallest |value|, grow the n best gradient candidates; returns how many grew."""
        layout = self.layout()
        layout.on_backward = None
        cand, self.candidates = self.candidates, None
        if cand is None:
            return 0
        scores, flat = cand
        flat = flat[scores > 0][:n]
        n = flat.numel()
        if n == 0:
            return 0
        keep = torch.topk(self.values.detach().abs(), self.values.numel() - n).indices
        new_flat = torch.cat([self.indices[keep], flat])
        new_vals = torch.cat([self.values.detach()[keep], torch.zeros(n, dtype=self.values.dtype)])
        self.set_selection(new_flat, new_vals, optimizer)
        return n


def _first_occurrence(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of `i` and the position of each one's first occurrence."""
    uniq, inv = torch.unique(i, return_inverse=True)
    pos = torch.arange(i.numel(), device=i.device)
    first = torch.full((uniq.numel(),), i.numel(), dtype=torch.long, device=i.device).scatter_reduce(
        0, inv, pos, reduce="amin")
    return uniq, first


class SpielCallback(TrainerCallback):
    """Arms the gradient probe before an update step and prunes/regrows after it."""

    def __init__(self, model, adapter_name: str, config: SpielConfig) -> None:
        self.model, self.name, self.config = model, adapter_name, config
        self.updates = 0

    def _due(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step `step` (1-based) updates the index set."""
        return step % self.config.update_every == 0 and step <= self.config.updates_until * max_steps

    def _count(self, d: SpielDelta) -> int:
        return max(1, round(self.config.drop_fraction * d.values.numel()))

    def on_step_begin(self, ctx: TrainContext) -> None:
        if self._due(ctx.step + 1, ctx.max_steps):  # arm the probe for the step about to run
            for d in sparse_deltas(self.model, self.name, SpielDelta):
                d.probe(self._count(d))

    def on_step_end(self, ctx: TrainContext) -> None:
        if self._due(ctx.step, ctx.max_steps):
            for d in sparse_deltas(self.model, self.name, SpielDelta):
                d.regrow(self._count(d), ctx.optimizer)
            self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "selection": selection_state(sparse_deltas(self.model, self.name, SpielDelta))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        if "selection" in state:
            load_selection_state(sparse_deltas(self.model, self.name, SpielDelta), state["selection"])


register("spiel", SpielConfig, SpielDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS, quantized_base=True))
