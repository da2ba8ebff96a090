"""SaRA: train the "temporarily ineffective" small-magnitude weights of each target matrix in place.

Per target matrix W, the entries with |W| below the `ratio` quantile are selected; only their
values train (a sparse delta with a sparse-only backward, see base.py). A nuclear-norm
penalty on the sparse update keeps it low-rank, and at the fractions of the run listed in
`schedule` the selection is made again from the current weights W + dW (progressive
parameter adjustment): the values trained so far stay applied (frozen) and the newly selected
entries train from zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import increasing_fractions, non_negative, positive_int, unit_ratio
from ...core.registry import Capabilities, register
from ...core.hooks import TrainContext, TrainerCallback
from .base import (SPARSE_LAYERS, SparseDelta, count_for, load_selection_state,
                      lowest_magnitude, selection_state, sparse_deltas)


@dataclass
class SaraConfig(AdapterConfig):
    """SaRA: `ratio` of each target matrix (its smallest-magnitude entries) trains as a sparse update.

    nuclear_weight: weight of the nuclear-norm penalty on each sparse update matrix (0: off).
    schedule: fractions of the run after which the trainable set is re-selected (progressive
    parameter adjustment); [] keeps the first selection.
    nuclear_every: apply the penalty's gradient every this many steps, scaled by it (an SVD per
    matrix is the costly part on CPU; 1 = every step, as in the paper).
    """

    peft_type = "SARA"
    not_in_peft = ()

    ratio: float = unit_ratio(0.1, "ratio")
    nuclear_weight: float = non_negative(1e-4)
    schedule: list[float] = increasing_fractions([0.5])
    nuclear_every: int = positive_int(1)

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """The trainer calls these: nuclear-norm gradient before each step, re-selection on the schedule."""
        return [SaraCallback(model, adapter_name, self)]


class SaraDelta(SparseDelta):
    """The sparse update of one matrix; frozen storage for one round per scheduled re-selection."""

    prefix = "sara"

    def __init__(self, base: nn.Module, config: SaraConfig, path: str, bank=None) -> None:
        w = layers.dense_weight(base) if isinstance(base, SPARSE_LAYERS) else None
        k = count_for(config.ratio, w.numel()) if w is not None else 1
        super().__init__(base, config, path, bank, k=k, frozen_slots=k * len(config.schedule))

    def reselect(self, round_index: int, optimizer=None) -> None:
        """Freeze the trained values, then select the smallest |W + dW| entries anew (values from zero)."""
        with torch.no_grad():  # W + dW before the values move into the frozen round (not counted twice)
            current = layers.dense_weight(self.base).to(self.values.dtype) + self.dense_delta()
            flat = lowest_magnitude(current, self.values.numel())
        self.freeze_round(round_index)
        self.set_selection(flat, None, optimizer)
        if optimizer is not None:  # the new entries have no history: restart their moments
            for t in optimizer.state.get(self.values, {}).values():
                if torch.is_tensor(t) and t.shape == self.values.shape:
                    t.zero_()


def nuclear_grad(delta: SparseDelta) -> torch.Tensor:
    """Gradient of ||dW||_* with respect to the trainable values: (U V^T) at the selected entries.

    The nuclear norm's (sub)gradient is U V^T over the non-zero singular values; directions of
    zero singular values (e.g. dW = 0 at the start) contribute nothing.
    """
    with torch.no_grad():
        d = delta.dense_delta().to(torch.float32 if delta.values.dtype != torch.float64 else torch.float64)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        keep = s > s.max().clamp_min(1e-30) * max(d.shape) * torch.finfo(d.dtype).eps
        if not bool(keep.any()):
            return torch.zeros_like(delta.values)
        g = u[:, keep] @ vh[keep]
        return g.flatten()[delta.indices].to(delta.values.dtype)


def nuclear_norm(model, adapter_name: str = "default") -> float:
    """Sum over the adapter's SaRA matrices of the nuclear norm of their update."""
    with torch.no_grad():
        return float(sum(torch.linalg.matrix_norm(d.dense_delta().float(), "nuc")
                         for d in sparse_deltas(model, adapter_name, SaraDelta)))


def reselect_steps(schedule: list[float], max_steps: int) -> list[int]:
    """The optimizer steps after which re-selection happens (distinct, within the run)."""
    steps = sorted({max(1, round(f * max_steps)) for f in schedule})
    return [s for s in steps if s < max_steps] if max_steps > 1 else []


class SaraCallback(TrainerCallback):
    """Adds the nuclear-norm gradient before each optimizer step and re-selects on the schedule."""

    def __init__(self, model, adapter_name: str, config: SaraConfig) -> None:
        self.model, self.name, self.config = model, adapter_name, config
        self.rounds = 0  # re-selections done

    def _deltas(self) -> list[SaraDelta]:
        return sparse_deltas(self.model, self.name, SaraDelta)

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        every = self.config.nuclear_every
        lam = self.config.nuclear_weight * every
        if lam <= 0 or ctx.step % every != 0:
            return
        for d in self._deltas():
            if d.values.grad is not None:
                d.values.grad.add_(nuclear_grad(d), alpha=lam)

    def on_step_end(self, ctx: TrainContext) -> None:
        steps = reselect_steps(self.config.schedule, ctx.max_steps)
        while self.rounds < len(steps) and ctx.step >= steps[self.rounds]:
            for d in self._deltas():
                d.reselect(self.rounds, ctx.optimizer)
            self.rounds += 1

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "selection": selection_state(self._deltas())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))
        if "selection" in state:
            load_selection_state(self._deltas(), state["selection"])


register("sara", SaraConfig, SaraDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS, quantized_base=True))
