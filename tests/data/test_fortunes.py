"""Fortunes loader: parsing, cleaning, de-duplication, deterministic stratified splits, clear errors."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from unipeft.data import DataError, INSTALL_COMMAND, list_categories, load_fortunes, read_fortune_file
from unipeft.data.fortunes import DEFAULT_CATEGORIES, FORTUNES_DIR
from tests.train._helpers import make_fortunes_dir


@pytest.fixture(scope="module")
def fdir(tmp_path_factory) -> Path:
    return make_fortunes_dir(tmp_path_factory.mktemp("fortunes"))


def test_parse_clean_and_dedupe(fdir):
    entries = read_fortune_file(fdir / "fruit")
    assert len(entries) == 21
    assert entries[0] == "Abold apple pie."  # overstrike removed
    splits = load_fortunes(["fruit", "cars", "space"], seed=0, split=(0.6, 0.2, 0.2), directory=fdir)
    every = splits.train.texts + splits.valid.texts + splits.test.texts
    assert "This quote sits in two categories." not in every  # shared by categories: dropped
    assert len(every) == 60 and len(set(every)) == 60
    assert splits.label_names == ["fruit", "cars", "space"]


def test_split_is_stratified_and_seeded(fdir):
    a = load_fortunes(["fruit", "cars", "space"], seed=3, split=(0.6, 0.2, 0.2), directory=fdir)
    b = load_fortunes(["fruit", "cars", "space"], seed=3, split=(0.6, 0.2, 0.2), directory=fdir)
    c = load_fortunes(["fruit", "cars", "space"], seed=4, split=(0.6, 0.2, 0.2), directory=fdir)
    assert a.test.texts == b.test.texts and a.train.labels == b.train.labels
    assert a.test.texts != c.test.texts
    assert Counter(a.train.labels) == {0: 12, 1: 12, 2: 12}
    assert Counter(a.valid.labels) == {0: 4, 1: 4, 2: 4} == Counter(a.test.labels)
    assert not set(a.train.texts) & set(a.test.texts)


def test_cap_per_category(fdir):
    s = load_fortunes(["fruit", "cars"], seed=0, split=(0.5, 0.25, 0.25), max_per_category=8, directory=fdir)
    assert s.sizes() == {"train": 8, "valid": 4, "test": 4}


def test_missing_folder_names_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y fortunes fortunes-min") as info:
        load_fortunes(["fruit"], directory=tmp_path / "nowhere")
    assert INSTALL_COMMAND in str(info.value)


def test_unknown_category_lists_available(fdir):
    with pytest.raises(DataError, match="no category 'poetry'.*available: cars, fruit, space"):
        load_fortunes(["fruit", "poetry"], directory=fdir)


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian fortunes not installed")
def test_real_default_categories():
    assert set(DEFAULT_CATEGORIES) <= set(list_categories())
    s = load_fortunes(DEFAULT_CATEGORIES, seed=0, max_per_category=200, max_chars=400)
    assert s.sizes() == {"train": 976, "valid": 209, "test": 209}
    assert len(set(s.train.labels)) == 8

