"""The training-time protocol: the only thing a trainer knows about a method's needs.

A method that needs control during training (rank re-allocation, progressive re-selection,
layer sampling, masking gradients) does not patch the trainer. Its config overrides the
declared defaults of AdapterConfig

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

from .errors import ConfigError


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


def _adapters(model: nn.Module) -> dict:
    """{adapter name: config} of an AdaptedModel; {} for a plain model (full fine-tuning)."""
    from .model import AdaptedModel

    return dict(model.peft_config) if isinstance(model, AdaptedModel) else {}


def method_callbacks(model: nn.Module) -> list[TrainerCallback]:
    """Callbacks the adapters' configs ask for (`training_callbacks`), in adapter order."""
    return [cb for name, cfg in _adapters(model).items() for cb in cfg.training_callbacks(model, name)]


def method_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups the adapters' configs ask for (`optimizer_groups`)."""
    return [g for name, cfg in _adapters(model).items() for g in cfg.optimizer_groups(name)]


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


class TrainingHooks:
    """Drives the callbacks the model's adapter configs ask for, for a plain PyTorch training loop:

    hooks = up.TrainingHooks(model, optimizer, max_steps=1000)
    for batch in loader:
        hooks.step_begin()
        loss = loss_fn(model(**batch)); loss.backward()
        hooks.before_optimizer_step()          # e.g. SaRA's nuclear-norm gradient
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        hooks.step_end()                       # e.g. SaRA's re-selection, LISA's layer sampling
    """

    def __init__(self, model: nn.Module, optimizer: Any, max_steps: int,
                 callbacks: list[TrainerCallback] | None = None) -> None:
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise ConfigError(f"TrainingHooks.max_steps: expected the run's positive number of optimizer steps, "
                              f"got {max_steps!r} (schedules are fractions of it)")
        self.ctx = TrainContext(model, optimizer, step=0, max_steps=max_steps)
        self.callbacks = CallbackList(method_callbacks(model) + list(callbacks or []))
        self._begun = False

    def _begin(self) -> None:
        if not self._begun:
            self._begun = True
            self.callbacks.on_train_begin(self.ctx)

    def step_begin(self) -> None:
        """Call before the forward pass of each optimizer step."""
        self._begin()
        self.callbacks.on_step_begin(self.ctx)

    def before_optimizer_step(self) -> None:
        """Call after backward (and gradient clipping), before optimizer.step()."""
        self._begin()
        self.callbacks.on_before_optimizer_step(self.ctx)

    def step_end(self) -> None:
        """Call after optimizer.step(): counts the step and runs the scheduled changes."""
        self.ctx.step += 1
        self.callbacks.on_step_end(self.ctx)

    def train_end(self) -> None:
        """Call once after the last step."""
        self.callbacks.on_train_end(self.ctx)

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.ctx.step
