"""One entry point from a data config to train/valid/test splits: fortunes, digits, WordNet or local files."""
from __future__ import annotations

from typing import Any

from .fortunes import DEFAULT_CATEGORIES, load_fortunes
from .splits import DataError, LabeledVectors, Splits, split_examples

SOURCES = ("fortunes", "digits", "wordnet", "file")
LM_SOURCES = ("wordnet", "file")  # prompt/completion data; the others are classification data
SKLEARN_INSTALL = "pip install scikit-learn"  # the digits ship inside scikit-learn's wheel


def load_digits(seed: int = 0, split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Splits:
    """scikit-learn's 1,797 8x8 digits as 64-d vectors scaled to [0, 1], split stratified by seed."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ModuleNotFoundError:
        raise DataError(f"data.source 'digits' needs scikit-learn; install it with: {SKLEARN_INSTALL}") from None
    bunch = sk_digits()
    features = (bunch.data / 16.0).astype("float32")
    examples = LabeledVectors(features, [int(y) for y in bunch.target], [str(d) for d in range(10)])
    return split_examples(examples, split, seed)


def load_files(task: str, data: Any, seed: int) -> Splits:
    """Splits from data.train (and optionally data.valid / data.test) files."""
    from .files import read_labeled_texts, read_prompt_completions

    if not data.train:
        raise DataError("data.train: set the path of the training file (csv, jsonl or text) for source 'file'")

    def read(path: str, label_names: list[str] | None = None):
        if task == "classification":
            return read_labeled_texts(path, data.text_column, data.label_column, data.format, label_names)
        return read_prompt_completions(path, data.prompt_column, data.completion_column, data.format)

    train = read(data.train)
    if data.valid is None and data.test is None:
        return split_examples(train, data.split, seed)
    names = train.label_names or None
    if data.valid is None or data.test is None:  # split the missing one off the training file
        frac = data.split[1] if data.valid is None else data.split[2]
        parts = split_examples(train, [1.0 - frac, frac, 0.0], seed)
        train, held = parts.train, parts.valid
        valid = held if data.valid is None else read(data.valid, names)
        test = held if data.test is None else read(data.test, names)
        return Splits(train, valid, test)
    return Splits(train, read(data.valid, names), read(data.test, names))


def load_data(task: str, data: Any, seed: int) -> Splits:
    """The splits a run's `data` section (train.config.DataConfig) describes, validated for `task`."""
    if data.source not in SOURCES:
        raise DataError(f"data.source: unknown source {data.source!r}; expected one of {list(SOURCES)}")
    if task == "causal_lm" and data.source not in LM_SOURCES:
        raise DataError(f"data.source {data.source!r} is a classification data set; task {task!r} needs "
                        f"source 'wordnet' or 'file' with prompt/completion columns")
    if task == "classification" and data.source == "wordnet":
        raise DataError("data.source 'wordnet' holds prompt/completion pairs (define a word); use it with "
                        "task: causal_lm")
    if data.source == "fortunes":
        categories = data.categories if data.categories is not None else list(DEFAULT_CATEGORIES)
        splits = load_fortunes(categories, seed, data.split, data.max_per_category, data.max_chars, data.directory)
    elif data.source == "digits":
        splits = load_digits(seed, tuple(data.split))
    elif data.source == "wordnet":
        from .wordnet import load_wordnet

        splits = load_wordnet(seed, data.split, data.pos, data.max_examples, data.directory)
    else:
        splits = load_files(task, data, seed)
    if len(splits.train) == 0:
        raise DataError("the training split is empty; use more data or a larger train fraction in data.split")
    return splits
