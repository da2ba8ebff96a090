"""Session-wide tiny models and data for the training tests (built once, offline)."""
from __future__ import annotations

import os

import pytest

from ._helpers import make_fortunes_dir, make_tiny_bert, make_tiny_gpt2, make_word_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Folder of a tiny dropout-free BERT classifier with MiniLM's tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """Folder of a tiny GPT-2 causal LM with MiniLM's tokenizer."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def word_csv(tmp_path_factory):
    """A 3-class CSV of 72 short sentences."""
    return make_word_csv(tmp_path_factory.mktemp("data") / "words.csv")


@pytest.fixture(scope="session")
def fake_fortunes(tmp_path_factory):
    """A small fake fortunes folder."""
    return make_fortunes_dir(tmp_path_factory.mktemp("fortunes"))
