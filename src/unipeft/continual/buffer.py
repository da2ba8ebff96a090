"""A reservoir replay buffer: a uniform sample of everything seen so far, in bounded memory."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ContinualError


@dataclass
class BufferBatch:
    """Examples drawn from the buffer; `logits` are the model's outputs when stored (DER/DER++), else None."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    task_ids: torch.Tensor
    logits: torch.Tensor | None
    index: torch.Tensor  # slots in the buffer

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R) over a stream of examples.

    After `seen` examples every one of them is in the buffer with probability
    min(1, capacity/seen), whatever the order they came in; memory never exceeds `capacity`.
    Slots are allocated on the first `add` from the shapes of the examples.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ContinualError(f"ReservoirBuffer.capacity: expected a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0
        self._size = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._inputs: list[torch.Tensor] = []
        self._labels = torch.empty(0, dtype=torch.long)
        self._task_ids = torch.empty(0, dtype=torch.long)
        self._logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._size

    @property
    def has_logits(self) -> bool:
        """True when logits were stored with the examples (DER/DER++ and the KD variant of FPF)."""
        return self._logits is not None

    def _allocate(self, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor | None) -> None:
        self._inputs = [torch.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype) for t in inputs]
        self._labels = torch.zeros(self.capacity, dtype=torch.long)
        self._task_ids = torch.zeros(self.capacity, dtype=torch.long)
        if logits is not None:
            self._logits = torch.zeros((self.capacity, *logits.shape[1:]), dtype=torch.float32)

    def add(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, task_ids: torch.Tensor | int,
            logits: torch.Tensor | None = None) -> int:
        """Offer a batch to the reservoir; returns how many of its examples were stored."""
        n = int(labels.shape[0])
        if not self._inputs:
            self._allocate(inputs, logits)
        if len(inputs) != len(self._inputs):
            raise ContinualError(f"ReservoirBuffer.add: expected {len(self._inputs)} input tensors, got {len(inputs)}")
        if (logits is None) != (self._logits is None):
            raise ContinualError("ReservoirBuffer.add: pass logits with every batch or with none")
        if isinstance(task_ids, int):
            task_ids = torch.full((n,), task_ids, dtype=torch.long)
        stored = 0
        for i in range(n):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self._gen))
            self.seen += 1
            if slot >= self.capacity:
                continue
            for buf, t in zip(self._inputs, inputs):
                buf[slot] = t[i].detach()
            self._labels[slot] = labels[i]
            self._task_ids[slot] = task_ids[i]
            if logits is not None:
                self._logits[slot] = logits[i].detach().float()
            self._size = max(self._size, slot + 1)
            stored += 1
        return stored

    def _gather(self, index: torch.Tensor) -> BufferBatch:
        return BufferBatch(tuple(t[index] for t in self._inputs), self._labels[index], self._task_ids[index],
                           None if self._logits is None else self._logits[index], index)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> BufferBatch:
        """Up to `batch_size` distinct stored examples, drawn uniformly."""
        if self._size == 0:
            raise ContinualError("ReservoirBuffer.sample: the buffer is empty; add examples first")
        gen = generator if generator is not None else self._gen
        index = torch.randperm(self._size, generator=gen)[:batch_size]
        return self._gather(index)

    def all(self) -> BufferBatch:
        """Every stored example, in slot order."""
        return self._gather(torch.arange(self._size))

    def class_counts(self, num_classes: int) -> list[int]:
        """How many stored examples each class has."""
        return torch.bincount(self._labels[:self._size], minlength=num_classes).tolist()
