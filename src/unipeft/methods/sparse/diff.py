"""Diff pruning: a dense task diff pushed towards sparsity, then pruned to `density` and fine-tuned sparse.

Phase "dense": every target matrix gets a dense diff dW (zero at the start) trained with an L1
penalty (the convex stand-in for the paper's relaxed L0 norm), applied as a gradient term
before each optimizer step. At `prune_at` of the run the diff is projected onto its
`density` largest-magnitude entries (magnitude pruning, as in Guo et al.) and the adapter
switches to phase "sparse": an index + value delta that keeps training with a fixed mask.
The phase is part of the config, so a saved adapter reloads in the phase it was saved in.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import choice, fraction, non_negative, unit_ratio
from ...core.registry import Capabilities, register
from ...core.hooks import TrainContext, TrainerCallback
from .base import SPARSE_LAYERS, SparseDelta, count_for, reset_optimizer_state
from .selective import DenseDelta

_PHASES = ("dense", "sparse")


@dataclass
class DiffPruningConfig(AdapterConfig):
    """Diff pruning: dense diff + L1 (`l1_weight`) until `prune_at` of the run, then `density` of it, sparse."""

    peft_type = "DIFF_PRUNING"

    density: float = unit_ratio(0.01, "density")
    l1_weight: float = non_negative(1e-5)
    prune_at: float = fraction(0.5, "a fraction of the run in [0, 1)")
    phase: str = choice("dense", _PHASES)

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """L1 gradient during the dense phase; pruning at `prune_at`."""
        return [DiffPruningCallback(model, adapter_name, self)]


class DiffDense(DenseDelta):
    """Phase "dense": the full diff, saved as `<path>.diff_weight`."""

    prefix = "diff"


class DiffSparse(SparseDelta):
    """Phase "sparse": `density` of the entries, saved as `<path>.diff_values/_indices`."""

    prefix = "diff"

    def __init__(self, base: nn.Module, config: DiffPruningConfig, path: str, bank=None,
                 init_indices: torch.Tensor | None = None) -> None:
        w = layers.dense_weight(base) if isinstance(base, SPARSE_LAYERS) else torch.zeros(1, 1)
        if init_indices is None:  # a placeholder until values/indices are loaded or pruned into it
            init_indices = torch.arange(count_for(config.density, w.numel()))
        super().__init__(base, config, path, bank, k=init_indices.numel(), init_indices=init_indices)


class DiffPruningDelta(DiffDense):
    """Registered class: builds the delta of the config's phase."""

    @classmethod
    def create(cls, base: nn.Module, config: DiffPruningConfig, path: str, bank=None, calibration=None):
        if config.phase == "sparse":
            return DiffSparse(base, config, path, bank)
        return DiffDense(base, config, path, bank)


def prune(model, adapter_name: str, optimizer=None) -> int:
    """Switch the adapter to phase "sparse": keep the `density` largest |dW| of each matrix; returns entries kept."""
    config = model.peft_config[adapter_name]
    if config.phase == "sparse":
        return 0
    built = {}
    for old in model.deltas(adapter_name):  # build everything first: a failure leaves the model unchanged
        if not isinstance(old, DiffDense):
            continue
        d = old.weight.detach()
        k = count_for(config.density, d.numel())
        flat = torch.topk(d.abs().flatten(), k).indices
        new = DiffSparse(old.base, config, old.path, init_indices=flat)
        with torch.no_grad():
            new.values.copy_(d.flatten()[new.indices])
        built[old.path] = (old, new)
    olds = model.replace_deltas(adapter_name, {path: new for path, (_, new) in built.items()},
                                config=config.replace(phase="sparse"))
    if optimizer is not None:
        swap = {id(olds[path].weight): new.values for path, (_, new) in built.items()}
        reset_optimizer_state(optimizer, [old.weight for old, _ in built.values()])
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
    return sum(new.values.numel() for _, new in built.values())


class DiffPruningCallback(TrainerCallback):
    """L1 gradient on the dense diff before each step; prune after step round(prune_at * max_steps)."""

    def __init__(self, model, adapter_name: str, config: DiffPruningConfig) -> None:
        self.model, self.name = model, adapter_name

    @property
    def config(self) -> DiffPruningConfig:
        """The adapter's current config (pruning replaces it by the "sparse" phase)."""
        return self.model.peft_config[self.name]

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        if self.config.phase != "dense" or self.config.l1_weight <= 0:
            return
        for d in self.model.deltas(self.name):
            if isinstance(d, DiffDense) and d.weight.grad is not None:
                d.weight.grad.add_(torch.sign(d.weight.detach()), alpha=self.config.l1_weight)

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.config.phase == "dense" and ctx.step >= max(1, round(self.config.prune_at * ctx.max_steps)):
            prune(self.model, self.name, ctx.optimizer)

    def on_train_begin(self, ctx: TrainContext) -> None:
        if self.config.phase == "dense" and self.config.prune_at == 0:
            prune(self.model, self.name, ctx.optimizer)


register("diff_pruning", DiffPruningConfig, DiffPruningDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS, quantized_base=True))
