"""The training-time control interface: the only thing the trainer knows about a method's needs.

A method that needs control during training (rank re-allocation, progressive re-selection,
layer sampling, masking gradients) does not patch the trainer. Its config object may define

    def training_callbacks(self, model, adapter_name) -> list[TrainerCallback]
    def optimizer_groups(self, adapter_name) -> list[dict]   # e.g. [{"params": "prompt", "lr": 3e-1}]

and the trainer calls the callbacks at the points below, in this order per optimizer step:
on_step_begin -> (forward/backward of every micro-batch) -> on_before_optimizer_step
(gradients are complete, synchronised across processes and clipped) -> optimizer/scheduler
step -> on_step_end. Callbacks that hold state return it from state_dict() so --resume
continues exactly. Groups from `optimizer_groups` come after the user's optimizer.groups,
so a user's pattern wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class TrainContext:
    """What a callback may look at or change during training."""

    model: nn.Module  # the unwrapped model (an AdaptedModel for adapter methods)
    optimizer: Any  # torch.optim.Optimizer; param_groups may be edited (lr, membership)
    step: int = 0  # optimizer steps completed
    max_steps: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)  # latest logged/eval values
    should_stop: bool = False  # set True to end training after this step


class TrainerCallback:
    """Base class: every hook is a no-op; override the ones you need."""

    def on_train_begin(self, ctx: TrainContext) -> None:
        """Once, after the optimizer is built (and after a resume's state is restored)."""

    def on_step_begin(self, ctx: TrainContext) -> None:
        """Before the micro-batches of optimizer step ctx.step + 1."""

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        """Gradients are complete (and clipped); e.g. mask or re-weight them here."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """After the optimizer and scheduler stepped; ctx.step is the step just done."""

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        """After an evaluation on the validation split."""

    def on_train_end(self, ctx: TrainContext) -> None:
        """After the last step, before the final adapter is saved."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in checkpoints (plain Python / tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


def method_callbacks(model: nn.Module) -> list[TrainerCallback]:
    """Callbacks the adapters' configs ask for (via `training_callbacks`), in adapter order."""
    out: list[TrainerCallback] = []
    for name, cfg in getattr(model, "peft_config", {}).items():
        hook = getattr(cfg, "training_callbacks", None)
        if callable(hook):
            out.extend(hook(model, name))
    return out


def method_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups the adapters' configs ask for (via `optimizer_groups`)."""
    out: list[dict[str, Any]] = []
    for name, cfg in getattr(model, "peft_config", {}).items():
        hook = getattr(cfg, "optimizer_groups", None)
        if callable(hook):
            out.extend(hook(name))
    return out


class CallbackList:
    """Calls every callback's hook in order."""

    def __init__(self, callbacks: list[TrainerCallback]) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args)
        return call

    def state_dict(self) -> list[dict[str, Any]]:
        """One state per callback, in order."""
        return [cb.state_dict() for cb in self.callbacks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore states saved by state_dict() (same callbacks, same order)."""
        for cb, state in zip(self.callbacks, states):
            cb.load_state_dict(state)
