"""Task streams: a labelled data set cut into tasks of disjoint classes (class- or task-incremental)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import ContinualError

SCENARIOS = ("class-il", "task-il")


@dataclass
class TensorData:
    """Examples as tensors: `inputs` (each indexed on dim 0) are passed to the model as `model(*inputs)`."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        if self.labels.dim() != 1:
            raise ContinualError(f"TensorData.labels: expected a 1-d tensor, got shape {tuple(self.labels.shape)}")
        bad = [i for i, t in enumerate(self.inputs) if t.shape[0] != self.labels.shape[0]]
        if not self.inputs or bad:
            raise ContinualError(f"TensorData: every input needs {self.labels.shape[0]} rows (one per label); "
                                 f"inputs {bad} differ" if bad else "TensorData: at least one input tensor is needed")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | Sequence[int]) -> "TensorData":
        """The examples at `index`, in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return TensorData(tuple(t[idx] for t in self.inputs), self.labels[idx])

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """Yield (inputs, labels) mini-batches; shuffled with `generator` unless shuffle=False."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield tuple(t[idx] for t in self.inputs), self.labels[idx]

    @staticmethod
    def concat(parts: Sequence["TensorData"]) -> "TensorData":
        """All examples of `parts`, one after the other."""
        n_inputs = len(parts[0].inputs)
        return TensorData(tuple(torch.cat([p.inputs[i] for p in parts]) for i in range(n_inputs)),
                          torch.cat([p.labels for p in parts]))


@dataclass
class Task:
    """One task of a stream: its classes (global label ids), its train/test examples and, after
    `TaskStream.with_validation`, validation examples held out of its training data."""

    index: int
    classes: list[int]
    train: TensorData
    test: TensorData
    valid: TensorData | None = None


class TaskStream:
    """An ordered list of tasks over disjoint classes of one label space.

    Labels stay global (0..num_classes-1) and the model has one output per class. In the
    class-incremental scenario ("class-il") the model predicts among every class; in the
    task-incremental one ("task-il") the task id is known, so the loss and the prediction of
    an example only consider the classes of its task (`mask_logits`).
    """

    def __init__(self, tasks: list[Task], num_classes: int, scenario: str = "class-il",
                 class_names: Sequence[str] | None = None) -> None:
        if scenario not in SCENARIOS:
            raise ContinualError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
        if not tasks:
            raise ContinualError("a task stream needs at least one task")
        self.tasks = tasks
        self.num_classes = num_classes
        self.scenario = scenario
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        # task id -> boolean mask over the classes, used in the task-incremental scenario
        self._masks = torch.zeros(len(tasks), num_classes, dtype=torch.bool)
        for t in tasks:
            self._masks[t.index, t.classes] = True

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def task_names(self) -> list[str]:
        """One readable name per task, e.g. 'computers/food'."""
        return ["/".join(self.class_names[c] for c in t.classes) for t in self.tasks]

    def mask_logits(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Task-IL: logits of classes outside each row's task set to -inf; class-IL: unchanged."""
        if self.scenario == "class-il":
            return logits
        mask = self._masks.to(logits.device)[task_ids]
        return logits.masked_fill(~mask, float("-inf"))

    @property
    def has_validation(self) -> bool:
        """True when every task holds validation examples (see `with_validation`)."""
        return all(t.valid is not None for t in self.tasks)

    def with_validation(self, fraction: float, seed: int = 0) -> "TaskStream":
        """A new stream whose tasks keep `fraction` of each class's training examples apart as `valid`.

        Per task and class, round(fraction * n) examples (at least 1, at most n - 1) are drawn with a
        generator seeded by `seed`; the rest stay in `train` in their original order. Test sets are shared.
        """
        if not 0 < fraction < 1:
            raise ContinualError(f"with_validation: fraction must be in (0, 1), got {fraction!r}")
        gen = torch.Generator().manual_seed(seed)
        tasks = []
        for t in self.tasks:
            held = []
            for c in t.classes:
                rows = torch.nonzero(t.train.labels == c).flatten()
                n = int(rows.numel())
                if n < 2:
                    raise ContinualError(f"with_validation: class {c} has {n} training example(s); need 2")
                k = min(n - 1, max(1, round(fraction * n)))
                held.append(rows[torch.randperm(n, generator=gen)[:k]])
            valid = torch.sort(torch.cat(held)).values
            keep = torch.ones(len(t.train), dtype=torch.bool)
            keep[valid] = False
            tasks.append(Task(t.index, list(t.classes), t.train.subset(torch.nonzero(keep).flatten()), t.test,
                              t.train.subset(valid)))
        return TaskStream(tasks, self.num_classes, self.scenario, self.class_names)

    def joint(self) -> TensorData:
        """The training examples of every task together (the joint-training upper bound)."""
        return TensorData.concat([t.train for t in self.tasks])

    def task_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """The task each label belongs to."""
        owner = torch.full((self.num_classes,), -1, dtype=torch.long)
        for t in self.tasks:
            owner[t.classes] = t.index
        return owner[labels]


def split_by_classes(train: TensorData, test: TensorData, classes_per_task: int | Sequence[Sequence[int]],
                     scenario: str = "class-il", class_names: Sequence[str] | None = None,
                     num_classes: int | None = None) -> TaskStream:
    """Cut a labelled data set into tasks of disjoint classes.

    `classes_per_task` is either a number (classes 0,1 | 2,3 | ... in label order) or an explicit
    list of class lists, e.g. [[3, 7], [0, 1]]. Every class of a task must occur in `train`.
    """
    n_cls = num_classes or int(max(train.labels.max(), test.labels.max())) + 1
    if isinstance(classes_per_task, int):
        if classes_per_task <= 0 or n_cls % classes_per_task:
            raise ContinualError(f"classes_per_task={classes_per_task} must be positive and divide the "
                                 f"{n_cls} classes; pass an explicit list of class lists otherwise")
        groups = [list(range(s, s + classes_per_task)) for s in range(0, n_cls, classes_per_task)]
    else:
        groups = [[int(c) for c in g] for g in classes_per_task]
    flat = [c for g in groups for c in g]
    if len(set(flat)) != len(flat) or any(not 0 <= c < n_cls for c in flat) or any(not g for g in groups):
        raise ContinualError(f"task classes must be non-empty, disjoint and within 0..{n_cls - 1}; got {groups}")
    present = set(train.labels.tolist())
    missing = [c for c in flat if c not in present]
    if missing:
        raise ContinualError(f"classes {missing} have no training example")
    tasks = []
    for i, classes in enumerate(groups):
        cls = torch.tensor(classes)
        tasks.append(Task(i, classes, train.subset(torch.nonzero(torch.isin(train.labels, cls)).flatten()),
                          test.subset(torch.nonzero(torch.isin(test.labels, cls)).flatten())))
    return TaskStream(tasks, n_cls, scenario, class_names)
