"""Debian's fortunes as a topic-classification task: one label per category file.

The packages `fortunes` and `fortunes-min` install /usr/share/games/fortunes/<category>;
entries are separated by lines holding only `%`. This module reads them, cleans them,
drops quotes that occur in more than one chosen category, and splits them by seed.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .splits import DataError, LabeledTexts, Splits, split_examples

FORTUNES_DIR = Path(os.environ.get("UNIPEFT_FORTUNES_DIR", "/usr/share/games/fortunes"))
INSTALL_COMMAND = "sudo apt-get install -y fortunes fortunes-min"
# fortunes-min ships these three; every other category comes with `fortunes`.
MIN_CATEGORIES = ("fortunes", "literature", "riddles")

# The shipped default task: eight topics with distinct vocabularies and >= 147 entries each.
DEFAULT_CATEGORIES = ("computers", "food", "law", "love", "politics", "science", "sports", "startrek")

_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "X\bX", "_\bX"


def fortunes_dir(directory: str | Path | None = None) -> Path:
    """The fortunes folder, or DataError with the command that installs it."""
    path = Path(directory) if directory is not None else FORTUNES_DIR
    if not path.is_dir():
        raise DataError(f"fortunes data not found at {path}; install it with: {INSTALL_COMMAND}")
    return path


def list_categories(directory: str | Path | None = None) -> list[str]:
    """Names of the installed fortune categories (files with a `.dat` index beside them)."""
    path = fortunes_dir(directory)
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and "." not in p.name and (path / f"{p.name}.dat").exists())


def clean_entry(text: str) -> str:
    """Remove overstrike sequences and trailing spaces, keep the line structure."""
    text = _OVERSTRIKE.sub("", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def read_fortune_file(path: str | Path) -> list[str]:
    """The cleaned, non-empty entries of one fortune file, in file order."""
    raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    entries = re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE)
    return [e for e in (clean_entry(x) for x in entries) if e]


def read_categories(categories: Sequence[str], directory: str | Path | None = None) -> LabeledTexts:
    """All entries of `categories`, labelled by position; quotes shared by two categories are dropped."""
    if not categories:
        raise DataError("fortunes: choose at least two categories")
    if len(set(categories)) != len(categories):
        raise DataError(f"fortunes: categories repeat: {list(categories)}")
    path = fortunes_dir(directory)
    available = list_categories(path)
    missing = [c for c in categories if c not in available]
    if missing:
        pkg = "fortunes-min" if all(c in MIN_CATEGORIES for c in missing) else "fortunes"
        hint = (f"install it with: sudo apt-get install -y {pkg}" if not available or pkg == "fortunes-min"
                else f"available: {', '.join(available)}")
        raise DataError(f"fortunes: no category {', '.join(map(repr, missing))} in {path}; {hint}")
    per_cat = {c: read_fortune_file(path / c) for c in categories}
    owners: dict[str, set[str]] = {}
    for cat, entries in per_cat.items():
        for e in entries:
            owners.setdefault(e, set()).add(cat)
    texts: list[str] = []
    labels: list[int] = []
    for y, cat in enumerate(categories):
        seen: set[str] = set()
        for e in per_cat[cat]:
            if len(owners[e]) == 1 and e not in seen:  # ambiguous or repeated quotes carry no signal
                seen.add(e)
                texts.append(e)
                labels.append(y)
    empty = [c for y, c in enumerate(categories) if y not in set(labels)]
    if empty:
        raise DataError(f"fortunes: categories {empty} have no usable entries in {path}")
    return LabeledTexts(texts, labels, list(categories))


def cap_per_label(examples: LabeledTexts, max_per_label: int | None, seed: int) -> LabeledTexts:
    """Keep at most `max_per_label` examples of each label, a seeded random subset in file order."""
    if max_per_label is None:
        return examples
    keep: list[int] = []
    for y in range(len(examples.label_names)):
        idx = [i for i, lab in enumerate(examples.labels) if lab == y]
        if len(idx) > max_per_label:
            chosen = np.random.default_rng([seed, y, 1]).choice(len(idx), max_per_label, replace=False)
            idx = [idx[j] for j in sorted(chosen)]
        keep += idx
    return examples.subset(sorted(keep))


def load_fortunes(categories: Sequence[str] = DEFAULT_CATEGORIES, seed: int = 0,
                  split: Sequence[float] = (0.7, 0.15, 0.15), max_per_category: int | None = None,
                  max_chars: int | None = None, directory: str | Path | None = None) -> Splits:
    """Fortunes topic classification: train/valid/test `LabeledTexts` split by `seed`, stratified.

    `categories` become labels 0..k-1 in the given order; `max_per_category` caps each class
    (seeded subset) before splitting; `max_chars` drops longer entries (e.g. whole poems).
    The same arguments always give the same splits.
    """
    examples = read_categories(list(categories), directory)
    if max_chars is not None:
        examples = examples.subset([i for i, t in enumerate(examples.texts) if len(t) <= max_chars])
    examples = cap_per_label(examples, max_per_category, seed)
    return split_examples(examples, split, seed)
