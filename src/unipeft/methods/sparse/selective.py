"""Layer-wise selective fine-tuning: LISA (a few sampled layers per period) and HFT (half the matrices per round).

Both train a dense additive update dW of each target matrix (zero at the start, so merging is
the generic W + dW) and decide by callback which updates train in each period: the others get
requires_grad=False and their optimizer state is dropped, so gradients and optimizer moments
exist only for the active part and the frozen updates stay bit-identical through the period.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.fields import positive_int
from ...core.registry import Capabilities, register
from ...core.targets import layer_index
from ...core.hooks import TrainContext, TrainerCallback
from .base import SPARSE_LAYERS, require_matrix_layer, reset_optimizer_state


class DenseDelta(Delta):
    """out = base(x) + x @ dW^T with a dense trainable dW (out x in), zero at the start."""

    kind = "output"
    commutes = True  # additive
    prefix = "dense"

    def __init__(self, base: nn.Module, config, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        require_matrix_layer(base, config, path)
        w = layers.dense_weight(base)
        self.weight = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = x if x.dtype == self.weight.dtype else x.to(self.weight.dtype)
        return base_out + F.linear(h, self.weight).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.weight)}

    def saved_key(self, key: str) -> str:
        return f"{self.prefix}_{key}"


def layer_groups(deltas: list[Delta], layers_pattern) -> dict[int | None, list[Delta]]:
    """Deltas by the layer index in their path (None: outside the layer stack)."""
    groups: dict[int | None, list[Delta]] = {}
    for d in deltas:
        groups.setdefault(layer_index(d.path, layers_pattern), []).append(d)
    return groups


class _PeriodicSelection(TrainerCallback):
    """At the start of every `interval` steps choose the deltas that train during that period."""

    def __init__(self, model, adapter_name: str, config, cls: type) -> None:
        self.model, self.name, self.config, self.cls = model, adapter_name, config, cls
        self.active: list[str] = []  # paths of the deltas training in the current period

    def deltas(self) -> list[Delta]:
        """This adapter's deltas of the method's class, in site order."""
        return [d for d in self.model.deltas(self.name) if isinstance(d, self.cls)]

    def choose(self, deltas: list[Delta], period: int) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_begin(self, ctx: TrainContext) -> None:
        deltas = self.deltas()
        if ctx.step % self.config.interval == 0 or not self.active:  # a new period (or a resumed run)
            chosen = set(self.choose(deltas, ctx.step // self.config.interval))
            for d in deltas:
                if d.path not in chosen:  # frozen for the period: free its optimizer moments
                    reset_optimizer_state(ctx.optimizer, d.parameters())
            self.active = sorted(chosen)
        active = set(self.active)
        for d in deltas:  # no gradient (and so no update) for the frozen ones during this step
            d.requires_grad_(d.path in active)

    def on_step_end(self, ctx: TrainContext) -> None:
        # Between steps every update is trainable again, so checkpoints (which hold the trainable
        # tensors) always contain all of them and a resumed run finds the adapter complete.
        for d in self.deltas():
            d.requires_grad_(True)

    def on_train_end(self, ctx: TrainContext) -> None:
        self.on_step_end(ctx)
        self.active = []


@dataclass
class LisaConfig(AdapterConfig):
    """LISA: every `interval` steps, `n_layers` randomly sampled layers train; the other layers are frozen.

    Targets outside the numbered layer stack (e.g. a pooler) train throughout, as LISA always
    trains the embeddings and the head.
    """

    peft_type = "LISA"

    n_layers: int = positive_int(2)
    interval: int = positive_int(20)
    seed: int = 0

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """Layer sampling at the start of every period."""
        return [LisaCallback(model, adapter_name, self, LisaDelta)]


class LisaDelta(DenseDelta):
    """Dense update of one matrix, saved as `<path>.lisa_weight`."""

    prefix = "lisa"


class LisaCallback(_PeriodicSelection):
    """Samples `n_layers` layers per period (a pure function of seed and period, so resuming is exact)."""

    def choose(self, deltas: list[Delta], period: int) -> set[str]:
        groups = layer_groups(deltas, self.config.layers_pattern)
        layers = sorted(k for k in groups if k is not None)
        g = torch.Generator().manual_seed(self.config.seed * 7_919 + period)
        picked = [layers[i] for i in torch.randperm(len(layers), generator=g)[:self.config.n_layers].tolist()]
        return {d.path for k in [None, *picked] for d in groups.get(k, [])}


@dataclass
class HftConfig(AdapterConfig):
    """Half Fine-Tuning: every `interval` steps, half of the target matrices of each layer train, half stay frozen."""

    peft_type = "HFT"

    interval: int = positive_int(50)
    seed: int = 0

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """Re-draws the trained half at the start of every round."""
        return [HftCallback(model, adapter_name, self, HftDelta)]


class HftDelta(DenseDelta):
    """Dense update of one matrix, saved as `<path>.hft_weight`."""

    prefix = "hft"


class HftCallback(_PeriodicSelection):
    """Per layer, exactly half of the matrices (odd counts: the extra one every other round)."""

    def choose(self, deltas: list[Delta], period: int) -> set[str]:
        chosen: set[str] = set()
        g = torch.Generator().manual_seed(self.config.seed * 7_919 + period)
        for _, group in sorted(layer_groups(deltas, self.config.layers_pattern).items(),
                               key=lambda kv: -1 if kv[0] is None else kv[0]):
            n = len(group) // 2 + (len(group) % 2) * (period % 2)
            chosen |= {group[i].path for i in torch.randperm(len(group), generator=g)[:n].tolist()}
        return chosen


_CAPS = Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS, quantized_base=True)
register("lisa", LisaConfig, LisaDelta, _CAPS)
register("hft", HftConfig, HftDelta, _CAPS)
