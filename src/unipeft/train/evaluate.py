"""Losses (summed, so any split of a batch adds up exactly) and evaluation metrics."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import eval_batches
from ..data.encode import IGNORE, EncodedSet, collate


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels (the trainer computes the loss itself)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def loss_terms(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example summed loss: cross-entropy of the class, or of every target token (prompt masked)."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none")
    return tok.view(shift_labels.shape).sum(dim=1)


def _gather(obj: list, accelerator: Any) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import gather_object
    return gather_object(obj)


def _lockstep(batches: list[list[int]], lengths: Any, batch_size: int, world: int) -> list[list[int]]:
    """`batches` padded with repeats of its last one (row 0 if empty) to the most any process has."""
    most = max(len(eval_batches(lengths, batch_size, r, world)) for r in range(world))
    return batches + [batches[-1] if batches else [0]] * (most - len(batches))


@torch.no_grad()
def predict_rows(model: nn.Module, data: EncodedSet, task: str, batch_size: int, pad_id: int,
                 accelerator: Any = None, lockstep: bool = False) -> list[tuple[int, float, int, int]]:
    """(index, loss sum, predicted class or correct-token count, weight) per example, over all processes.

    `lockstep` (FSDP: every forward gathers parameters from all processes): each process runs as
    many forwards as the busiest one; the extra ones are discarded.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out: list[tuple[int, float, int, int]] = []
    mine = eval_batches(data.lengths, batch_size, rank, world)
    runs = _lockstep(mine, data.lengths, batch_size, world) if lockstep and len(data) else mine
    try:
        for n, idx in enumerate(runs):
            batch = {k: v.to(device) for k, v in collate([data.rows[i] for i in idx], pad_id).items()}
            logits = model(**model_inputs(batch)).logits
            if n >= len(mine):
                continue  # a lockstep forward: its rows belong to another batch
            losses = loss_terms(task, logits, batch["labels"])
            if task == "classification":
                preds = logits.argmax(-1).tolist()
            else:
                hit = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & (batch["labels"][:, 1:] != IGNORE)
                preds = hit.sum(1).tolist()
            out += [(i, float(l), int(p), data.weights[i]) for i, l, p in zip(idx, losses.tolist(), preds)]
    finally:
        model.train(was_training)
    return sorted(_gather(out, accelerator))


def metrics_from_rows(task: str, rows: list[tuple[int, float, int, int]], labels: list[int] | None,
                      num_labels: int = 0) -> dict[str, float]:
    """accuracy, macro-F1 and mean loss (classification) or token loss, perplexity, token accuracy (LM)."""
    total_w = sum(r[3] for r in rows)
    loss = sum(r[1] for r in rows) / max(1, total_w)
    if task != "classification":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": sum(r[2] for r in rows) / max(1, total_w), "examples": len(rows)}
    from sklearn.metrics import f1_score

    y_true = np.array([labels[r[0]] for r in rows])
    y_pred = np.array([r[2] for r in rows])
    f1 = f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels)), zero_division=0)
    return {"accuracy": float((y_true == y_pred).mean()), "macro_f1": float(f1), "loss": loss,
            "examples": len(rows)}


def evaluate(model: nn.Module, data: EncodedSet, task: str, batch_size: int, pad_id: int,
             num_labels: int = 0, accelerator: Any = None, lockstep: bool = False) -> dict[str, float]:
    """Metrics of `model` on an encoded split (every process gets the same numbers; lockstep: see predict_rows)."""
    rows = predict_rows(model, data, task, batch_size, pad_id, accelerator, lockstep)
    labels = [r["labels"] for r in data.rows] if task == "classification" else None
    return metrics_from_rows(task, rows, labels, num_labels)
