"""`unipeft kg`: an end-to-end run on Nations, and one-line errors with exit code 2 for bad input."""
from __future__ import annotations

import json

import pytest

from unipeft.cli import main
from unipeft.kg import cli as kg_cli
from unipeft.kg.calibrate import TRAIN_STRUCTURES
from unipeft.kg.datasets import DATASETS
from unipeft.kg.structures import STRUCTURES


def test_parser_lists_match_the_library():
    assert kg_cli.DATASET_NAMES == DATASETS
    assert kg_cli.STRUCTURE_NAMES == tuple(STRUCTURES)
    assert kg_cli.TRAIN_DEFAULT == ",".join(TRAIN_STRUCTURES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A predictor and a calibrator trained on Nations through the CLI."""
    root = tmp_path_factory.mktemp("kg")
    assert main(["kg", "train-link", "--dataset", "nations", "--out", str(root / "link"), "--rank", "8",
                 "--epochs", "5"]) == 0
    assert main(["kg", "calibrate", "--predictor", str(root / "link"), "--out", str(root / "cal"),
                 "--structures", "1p,2p,2in", "--n-train", "40", "--n-valid", "10", "--steps", "12",
                 "--fraction", "0.5"]) == 0
    return root


def test_end_to_end(runs, capsys):
    capsys.readouterr()
    assert main(["kg", "data", "--dataset", "nations"]) == 0
    assert json.loads(capsys.readouterr().out) == {"entities": 14, "relations": 55, "train": 1592, "valid": 199,
                                                    "test": 201}
    metrics = json.loads((runs / "link" / "metrics.json").read_text())
    assert 0 < metrics["test"]["mrr"] <= 1
    record = json.loads((runs / "cal" / "kg_calibration.json").read_text())
    assert record["dataset"] == "nations" and record["train_queries"] == {"1p": 20, "2p": 20, "2in": 20}
    assert (runs / "cal" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    out_json = runs / "eval.json"
    assert main(["kg", "eval", "--predictor", str(runs / "link"), "--adapter", str(runs / "cal"),
                 "--structures", "1p,2in", "--n-test", "15", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["method"] == "CQD^A" and set(result["per_structure"]) == {"1p", "2in"}
    assert f"avg_mrr: {result['avg_mrr']:.4f}" in printed
    assert main(["kg", "answer", "--predictor", str(runs / "link"), "--structure", "2p",
                 "--query", "usa,embassy,embassy^-1", "--top", "3"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("  1. ")


@pytest.mark.parametrize("argv,message", [
    (["kg"], "needs an action"),
    (["kg", "data", "--dataset", "fb15k"], "unknown knowledge graph 'fb15k'"),
    (["kg", "eval", "--predictor", "/nonexistent/pred"], "no predictor.json in /nonexistent/pred"),
    (["kg", "eval", "--predictor", "{link}", "--structures", "1p,9p"], "unknown query structure"),
    (["kg", "eval", "--predictor", "{link}", "--split", "train"], "--split: expected valid or test"),
    (["kg", "eval", "--predictor", "{tmp}"], "no predictor.json"),
    (["kg", "eval", "--predictor", "{link}", "--adapter", "/nonexistent/cal"], "does not exist"),
    (["kg", "calibrate", "--predictor", "{link}", "--out", "{tmp}", "--fraction", "0"], "fraction"),
    (["kg", "calibrate", "--predictor", "{link}", "--out", "{tmp}", "--n-train", "0"], "--n-train"),
    (["kg", "answer", "--predictor", "{link}", "--structure", "2p", "--query", "usa,embassy"], "has 3 slots"),
    (["kg", "answer", "--predictor", "{link}", "--structure", "1p", "--query", "atlantis,embassy"],
     "unknown entity 'atlantis'"),
])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, argv, message):
    argv = [a.format(link=runs / "link", tmp=tmp_path / "out") for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unipeft kg: error: ") and message in err, err
