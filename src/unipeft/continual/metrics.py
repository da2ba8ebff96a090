"""Continual-learning metrics on an accuracy matrix, and the evaluation that fills it.

`acc[i][j]` is the accuracy on task j's test set after training on tasks 0..i (rows may hold
all tasks, including future ones; the metrics only read j <= i). Definitions (Chaudhry et al.
2018; Lopez-Paz & Ranzato 2017):

- average accuracy after task i:  mean_{j<=i} acc[i][j]; *final* average accuracy uses i = T-1
- forgetting of task j < T-1:     max_{i in j..T-2} acc[i][j] - acc[T-1][j]
- average forgetting:             mean_{j<T-1} forgetting(j)
- backward transfer (BWT):        mean_{j<T-1} (acc[T-1][j] - acc[j][j])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ContinualError
from .stream import TaskStream

Matrix = Sequence[Sequence[float]]


def _check(acc: Matrix) -> int:
    t = len(acc)
    if t == 0 or any(len(row) < i + 1 for i, row in enumerate(acc)):
        raise ContinualError("accuracy matrix: row i needs at least i+1 entries (tasks 0..i); "
                             f"got row lengths {[len(r) for r in acc]}")
    return t


def average_accuracy(acc: Matrix, after: int | None = None) -> float:
    """Mean accuracy over tasks 0..i after training task i (default: the last task)."""
    t = _check(acc)
    i = t - 1 if after is None else after
    return sum(acc[i][j] for j in range(i + 1)) / (i + 1)


def forgetting_per_task(acc: Matrix) -> list[float]:
    """For every task but the last: best earlier accuracy minus final accuracy."""
    t = _check(acc)
    return [max(acc[i][j] for i in range(j, t - 1)) - acc[t - 1][j] for j in range(t - 1)]


def average_forgetting(acc: Matrix) -> float:
    """Mean forgetting over tasks 0..T-2 (0.0 for a single task)."""
    f = forgetting_per_task(acc)
    return sum(f) / len(f) if f else 0.0


def backward_transfer(acc: Matrix) -> float:
    """Mean of final minus just-learned accuracy over tasks 0..T-2 (negative = forgetting)."""
    t = _check(acc)
    return sum(acc[t - 1][j] - acc[j][j] for j in range(t - 1)) / (t - 1) if t > 1 else 0.0


@torch.no_grad()
def predict(model: nn.Module, stream: TaskStream, inputs: tuple[torch.Tensor, ...], task_ids: torch.Tensor,
            batch_size: int = 256) -> torch.Tensor:
    """Predicted labels (task-IL: restricted to each example's task classes)."""
    preds = []
    for start in range(0, int(task_ids.shape[0]), batch_size):
        part = tuple(t[start:start + batch_size] for t in inputs)
        logits = stream.mask_logits(model(*part), task_ids[start:start + batch_size])
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds)


def evaluate(model: nn.Module, stream: TaskStream, batch_size: int = 256, upto: int | None = None,
             split: str = "test") -> list[float]:
    """Accuracy (0..1) on the `split` ("test" or "valid") examples of tasks 0..upto (default: all), model in
    eval mode (restored afterwards)."""
    if split not in ("test", "valid"):
        raise ContinualError(f"evaluate: split must be 'test' or 'valid', got {split!r}")
    if split == "valid" and not stream.has_validation:
        raise ContinualError("evaluate: the stream has no validation split (see TaskStream.with_validation)")
    was_training = model.training
    model.eval()
    try:
        accs = []
        for task in stream.tasks[:None if upto is None else upto + 1]:
            data = getattr(task, split)
            ids = torch.full((len(data),), task.index, dtype=torch.long)
            pred = predict(model, stream, data.inputs, ids, batch_size)
            accs.append(float((pred == data.labels).float().mean()) if len(data) else float("nan"))
        return accs
    finally:
        model.train(was_training)
