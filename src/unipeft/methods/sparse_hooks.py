"""Method callbacks in a hand-written PyTorch loop: the same hooks unipeft.train's trainer calls.

    hooks = up.TrainingHooks(model, optimizer, max_steps=1000)
    for batch in loader:
        hooks.step_begin()
        loss = loss_fn(model(**batch)); loss.backward()
        hooks.before_optimizer_step()          # e.g. SaRA's nuclear-norm gradient
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        hooks.step_end()                       # e.g. SaRA's re-selection, LISA's layer sampling
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..train.callbacks import CallbackList, TrainContext, TrainerCallback, method_callbacks


class TrainingHooks:
    """Drives the callbacks the model's adapter configs ask for, for a plain PyTorch training loop."""

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
