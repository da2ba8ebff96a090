"""load_data: digits, file sources with and without their own valid/test files, and clear errors."""
from __future__ import annotations

import sys
from collections import Counter

import pytest

from unipeft.data import DataError, LabeledVectors, load_data, load_digits
from unipeft.train import config_from_dict


def test_digits_split_and_missing_sklearn(monkeypatch):
    s = load_digits(seed=1)
    assert isinstance(s.train, LabeledVectors) and s.train.features.shape[1] == 64
    assert sum(s.sizes().values()) == 1797 and float(s.train.features.max()) == 1.0
    assert load_digits(seed=1).test.labels == s.test.labels and load_digits(seed=2).test.labels != s.test.labels
    assert min(Counter(s.test.labels).values()) >= 25  # stratified: every digit in the test split
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(DataError, match="install it with: pip install scikit-learn"):
        load_digits()


def _data(**data):
    cfg = config_from_dict({"data": data})
    return cfg.data


def test_file_source_splits_and_held_out_files(tmp_path):
    lines = ["text,label"] + [f"item {i},{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.csv").write_text("text,label\nx,a\ny,b\nz,b\n")
    s = load_data("classification", _data(source="file", train=str(tmp_path / "train.csv"), split=[0.5, 0.25, 0.25]),
                  seed=0)
    assert s.sizes() == {"train": 20, "valid": 10, "test": 10} and s.label_names == ["a", "b"]
    s = load_data("classification", _data(source="file", train=str(tmp_path / "train.csv"),
                                          test=str(tmp_path / "test.csv"), split=[0.5, 0.25, 0.25]), seed=0)
    assert s.sizes() == {"train": 30, "valid": 10, "test": 3}  # valid split off train, test is the file
    assert s.test.labels == [0, 1, 1]
    (tmp_path / "odd.csv").write_text("text,label\nx,a\ny,c\n")
    with pytest.raises(DataError, match=r"labels \['c'\] do not occur in the training file"):
        load_data("classification", _data(source="file", train=str(tmp_path / "train.csv"),
                                          test=str(tmp_path / "odd.csv")), seed=0)


def test_source_errors():
    with pytest.raises(DataError, match="data.train: set the path"):
        load_data("classification", _data(source="file"), seed=0)
    with pytest.raises(DataError, match="task 'causal_lm' needs source 'wordnet' or 'file'"):
        load_data("causal_lm", _data(source="digits"), seed=0)
