"""UMLS, Kinships and Nations come from the files inside the pykeen wheel, with the published counts."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from unipeft.core.errors import ConfigError
from unipeft.kg import datasets
from unipeft.kg.datasets import MissingDependencyError, from_triples, load_dataset, pykeen_dataset_dir

# (entities, relations, train, valid, test) as pykeen documents them.
COUNTS = {"umls": (135, 46, 5216, 652, 661), "kinships": (104, 25, 8544, 1068, 1074),
          "nations": (14, 55, 1592, 199, 201)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_match_pykeen(name):
    data = load_dataset(name.upper())  # names are case-insensitive
    n_e, n_r, n_train, n_valid, n_test = COUNTS[name]
    assert data.summary() == {"entities": n_e, "relations": n_r, "train": n_train, "valid": n_valid, "test": n_test}
    folder = pykeen_dataset_dir(name)
    assert folder.parts[-3:] == ("pykeen", "datasets", name)
    first = (folder / "train.txt").read_text().splitlines()[0].split("\t")
    h, r, t = data.triples["train"][0].tolist()
    assert (data.entities[h], data.relations[r], data.entities[t]) == tuple(first)


def test_graph_has_reciprocals():
    data = from_triples("toy", {"train": [("a", "likes", "b")], "test": [("b", "likes", "c")]})
    adj = data.graph("train")
    assert adj.shape == (2, 3, 3) and adj.sum() == 2
    assert adj[0, 0, 1] and adj[1, 1, 0]  # likes(a, b) and likes^-1(b, a)
    assert data.graph("train", "test").sum() == 4
    with pytest.raises(ConfigError, match="unknown split.*'nope'.*available"):
        data.graph("nope")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown knowledge graph 'fb15k'.*umls, kinships, nations"):
        load_dataset("fb15k")


def test_missing_pykeen_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda n, *a: None if n == "pykeen" else real(n, *a))
    with pytest.raises(MissingDependencyError) as err:
        load_dataset("umls")
    assert "pip install 'unipeft[kg]'" in str(err.value)


def test_core_package_imports_without_pykeen():
    """Nothing outside unipeft.kg's data loading may import pykeen (it is an optional extra)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['pykeen'] = None; import unipeft, unipeft.kg.cli, unipeft.kg.calibrate; "
            "import unipeft.kg.calibrator; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_ids_are_stable(umls):
    again = load_dataset("umls")
    assert umls.entities == again.entities and torch.equal(umls.triples["test"], again.triples["test"])
