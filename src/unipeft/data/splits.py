"""Split containers and deterministic, stratified train/valid/test splitting."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import ConfigError, UnipeftError

SPLITS = ("train", "valid", "test")


class DataError(UnipeftError, ValueError):
    """A data source is missing, empty, garbled, or does not have the requested columns/labels."""


@dataclass
class LabeledTexts:
    """Texts with integer labels indexing `label_names` (sequence classification)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "LabeledTexts":
        """The examples at `indices`, in that order."""
        return LabeledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


@dataclass
class LabeledVectors:
    """Feature vectors (n, d) with integer labels (e.g. scikit-learn's digits)."""

    features: np.ndarray
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "LabeledVectors":
        """The examples at `indices`, in that order."""
        idx = list(indices)
        return LabeledVectors(self.features[idx], [self.labels[i] for i in idx], self.label_names)


@dataclass
class PromptCompletions:
    """Prompt/completion pairs for causal LM training (the loss covers the completion only)."""

    prompts: list[str]
    completions: list[str]
    label_names: list[str] = field(default_factory=list)  # unused; keeps the split API uniform

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> "PromptCompletions":
        """The examples at `indices`, in that order."""
        return PromptCompletions([self.prompts[i] for i in indices], [self.completions[i] for i in indices])


Examples = LabeledTexts | LabeledVectors | PromptCompletions


@dataclass
class Splits:
    """The train/valid/test splits of one task."""

    train: Any
    valid: Any
    test: Any

    @property
    def label_names(self) -> list[str]:
        """Class names (empty for causal LM data)."""
        return list(self.train.label_names)

    def get(self, name: str) -> Any:
        """The split called `name` ('train', 'valid' or 'test')."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {name: len(getattr(self, name)) for name in SPLITS}


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, valid, test) fractions: three non-negative numbers summing to 1."""
    if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions):
        raise ConfigError(f"data.split: expected three non-negative fractions [train, valid, test], got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ConfigError(f"data.split: fractions must sum to 1 with a positive train share, got {list(fractions)}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int
                     ) -> tuple[list[int], list[int], list[int]]:
    """Indices of a train/valid/test split with each label's share kept; same seed -> same split.

    Each class is shuffled by its own generator (seeded by `seed` and the class), so adding a
    class does not reshuffle the others.
    """
    _, fv, ft = check_fractions(fractions)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(int(y), []).append(i)
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for y in sorted(by_label):
        idx = by_label[y]
        order = np.random.default_rng([seed, y]).permutation(len(idx))
        n = len(idx)
        n_test = int(round(n * ft)) if ft > 0 else 0
        n_valid = int(round(n * fv)) if fv > 0 else 0
        if n >= 3:  # every class appears in every requested split
            n_test = max(n_test, 1 if ft > 0 else 0)
            n_valid = max(n_valid, 1 if fv > 0 else 0)
        shuffled = [idx[j] for j in order]
        test += shuffled[:n_test]
        valid += shuffled[n_test:n_test + n_valid]
        train += shuffled[n_test + n_valid:]
    return sorted(train), sorted(valid), sorted(test)


def random_split(n: int, fractions: Sequence[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of an unstratified train/valid/test split (for unlabeled data); same seed -> same split."""
    _, fv, ft = check_fractions(fractions)
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    n_test, n_valid = int(round(n * ft)), int(round(n * fv))
    return sorted(order[n_test + n_valid:]), sorted(order[n_test:n_test + n_valid]), sorted(order[:n_test])


def split_examples(examples: Examples, fractions: Sequence[float], seed: int) -> Splits:
    """Split one example set into train/valid/test (stratified when it has labels)."""
    labels = getattr(examples, "labels", None)
    parts = (stratified_split(labels, fractions, seed) if labels is not None
             else random_split(len(examples), fractions, seed))
    return Splits(*(examples.subset(p) for p in parts))
