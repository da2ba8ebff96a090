"""Offline data sets, tokenization with dynamic padding, and length-grouped batching.

    from unipeft.data import load_fortunes
    splits = load_fortunes(["computers", "food", "law"], seed=0)
    splits.train.texts, splits.train.labels, splits.label_names
"""
from .batching import epoch_batches, eval_batches, micro_batches, split_even
from .encode import IGNORE, EncodedSet, collate, encode_split
from .fortunes import DEFAULT_CATEGORIES, INSTALL_COMMAND, list_categories, load_fortunes, read_fortune_file
from .sources import load_data, load_digits
from .splits import (DataError, LabeledTexts, LabeledVectors, PromptCompletions, Splits, split_examples,
                     stratified_split)

__all__ = ["DEFAULT_CATEGORIES", "DataError", "EncodedSet", "IGNORE", "INSTALL_COMMAND", "LabeledTexts",
           "LabeledVectors", "PromptCompletions", "Splits", "collate", "encode_split", "epoch_batches",
           "eval_batches", "list_categories", "load_data", "load_digits", "load_fortunes", "micro_batches",
           "read_fortune_file", "split_even", "split_examples", "stratified_split"]
