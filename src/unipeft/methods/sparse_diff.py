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

from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.registry import Capabilities, register
from ..train.callbacks import TrainContext, TrainerCallback
from ._sparse import SPARSE_LAYERS, SparseDelta, check_ratio, count_for, reset_optimizer_state, weight_2d
from .selective import DenseDelta

_PHASES = ("dense", "sparse")


@dataclass
class DiffPruningConfig(AdapterConfig):
    """Diff pruning: dense diff + L1 (`l1_weight`) until `prune_at` of the run, then `density` of it, sparse."""

    peft_type = "DIFF_PRUNING"

    density: float = 0.01
    l1_weight: float = 1e-5
    prune_at: float = 0.5
    phase: str = "dense"

    def validate(self) -> None:
        super().validate()
        check_ratio("DiffPruningConfig", "density", self.density)
        if not 0.0 <= self.prune_at < 1.0:
            raise ConfigError(f"DiffPruningConfig.prune_at: expected a fraction of the run in [0, 1), "
                              f"got {self.prune_at!r}")
        if not isinstance(self.l1_weight, (int, float)) or self.l1_weight < 0:
            raise ConfigError(f"DiffPruningConfig.l1_weight: expected a number >= 0, got {self.l1_weight!r}")
        if self.phase not in _PHASES:
            raise ConfigError(f"DiffPruningConfig.phase: expected one of {_PHASES}, got {self.phase!r}")

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """L1 gradient during the dense phase; pruning at `prune_at`."""
        return [DiffPruningCallback(model, adapter_name, self)]


class DiffDense(DenseDelta):
    """Phase "dense": the full diff, saved as `<path>.diff_weight`."""

    prefix = "diff"


class DiffSparse(SparseDelta):
    """Phase "sparse": `density` of the entries, saved as `<path>.diff_values/_indices`."""

    prefix = "diff"

    def __init__(self, base: nn.Module, config: DiffPruningConfig, path: str,
                 init_indices: torch.Tensor | None = None) -> None:
        w = weight_2d(base) if isinstance(base, SPARSE_LAYERS) else torch.zeros(1, 1)
        if init_indices is None:  # a placeholder until values/indices are loaded or pruned into it
            init_indices = torch.arange(count_for(config.density, w.numel()))
        super().__init__(base, config, path, init_indices.numel(), init_indices=init_indices)


class DiffPruningDelta(DiffDense):
    """Registered class: builds the delta of the config's phase."""

    @classmethod
    def create(cls, base: nn.Module, config: DiffPruningConfig, path: str):
        if config.phase == "sparse":
            return DiffSparse(base, config, path)
        return DiffDense(base, config, path)


def prune(model, adapter_name: str, optimizer=None) -> int:
    """Switch the adapter to phase "sparse": keep the `density` largest |dW| of each matrix; returns entries kept."""
    config = model.peft_config[adapter_name]
    if config.phase == "sparse":
        return 0
    sites = [s for s in model.sites() if isinstance(s.deltas[adapter_name] if adapter_name in s.deltas else None,
                                                    DiffDense)]
    if any(adapter_name in s.merged for s in sites):
        raise ConfigError(f"adapter '{adapter_name}' is merged; unmerge() before pruning it")
    built = []
    for site in sites:  # build everything first: a failure leaves the model unchanged
        old = site.deltas[adapter_name]
        d = old.weight.detach()
        k = count_for(config.density, d.numel())
        flat = torch.topk(d.abs().flatten(), k).indices
        new = DiffSparse(site.base_layer, config, site.path, init_indices=flat)
        with torch.no_grad():
            new.values.copy_(d.flatten()[new.indices])
        built.append((site, old, new))
    trainable = any(p.requires_grad for _, old, _ in built for p in old.parameters())
    for site, old, new in built:
        new.requires_grad_(trainable)
        site.deltas[adapter_name] = new
        if optimizer is not None:
            reset_optimizer_state(optimizer, [old.weight])
            for group in optimizer.param_groups:
                group["params"] = [new.values if p is old.weight else p for p in group["params"]]
    config.phase = "sparse"
    model._ctx.version += 1  # sites re-resolve their deltas
    return sum(new.values.numel() for _, _, new in built)


class DiffPruningCallback(TrainerCallback):
    """L1 gradient on the dense diff before each step; prune after step round(prune_at * max_steps)."""

    def __init__(self, model, adapter_name: str, config: DiffPruningConfig) -> None:
        self.model, self.name, self.config = model, adapter_name, config

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        if self.config.phase != "dense" or self.config.l1_weight <= 0:
            return
        for s in self.model.sites():
            d = s.deltas[self.name] if self.name in s.deltas else None
            if isinstance(d, DiffDense) and d.weight.grad is not None:
                d.weight.grad.add_(torch.sign(d.weight.detach()), alpha=self.config.l1_weight)

    def on_step_end(self, ctx: TrainContext) -> None:
        if self.config.phase == "dense" and ctx.step >= max(1, round(self.config.prune_at * ctx.max_steps)):
            prune(self.model, self.name, ctx.optimizer)

    def on_train_begin(self, ctx: TrainContext) -> None:
        if self.config.phase == "dense" and self.config.prune_at == 0:
            prune(self.model, self.name, ctx.optimizer)


register("diff_pruning", DiffPruningConfig,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS))(DiffPruningDelta)
