"""`unipeft train/eval/predict/info` through unipeft.cli.main; bad input: one error line, exit 2, nothing written."""
from __future__ import annotations

import json

import pytest

from unipeft.cli import main

from ._helpers import summary, tiny_config, write_config


@pytest.fixture(scope="module")
def cls_run(tiny_bert, word_csv, tmp_path_factory):
    """A classification run trained through `unipeft train` (overrides on the command line)."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "c.yaml", **tiny_config(tiny_bert, word_csv, root / "never"))
    assert main(["train", str(config), "--quiet", "--output_dir", str(root / "run"), "--epochs", "4"]) == 0
    return root / "run"


def test_train_prints_test_accuracy_and_applies_overrides(cls_run, capsys):
    s = summary(cls_run)
    assert s["steps"] == 20 and not cls_run.with_name("never").exists()  # --epochs 4, --output_dir
    assert "epochs: 4.0" in (cls_run / "config.yaml").read_text()


def test_eval_reproduces_the_run_metrics(cls_run, word_csv, capsys):
    s = summary(cls_run)
    assert main(["eval", str(cls_run)]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["split"] == "test" and test["accuracy"] == pytest.approx(s["test"]["accuracy"])
    assert test["loss"] == pytest.approx(s["test"]["loss"], rel=1e-5)
    assert main(["eval", str(cls_run), "--split", "valid"]) == 0
    assert json.loads(capsys.readouterr().out)["macro_f1"] == pytest.approx(s["valid"]["macro_f1"])
    assert main(["eval", str(cls_run), "--data", str(word_csv)]) == 0  # a whole file as the test split
    assert json.loads(capsys.readouterr().out)["examples"] == 72


def test_predict_labels(cls_run, word_csv, tmp_path, capsys):
    rows = [line.rsplit(",", 1) for line in word_csv.read_text().splitlines()[1:]]
    texts = tmp_path / "in.txt"
    texts.write_text("\n\n".join(t for t, _ in rows[1:]) + "\n")  # blank lines are skipped
    assert main(["predict", str(cls_run), rows[0][0], "--file", str(texts)]) == 0
    out = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [o[2] for o in out] == [t for t, _ in rows]  # label, probability, the text; in input order
    assert all(o[0] in ("cars", "fruit", "space") and 1 / 3 < float(o[1]) <= 1 for o in out)
    accuracy = sum(o[0] == y for o, (_, y) in zip(out, rows)) / len(rows)
    assert accuracy >= 0.8  # chance is 1/3


def test_predict_generates_for_causal_lm(tiny_gpt2, tmp_path, capsys):
    data = tmp_path / "pairs.txt"  # text format: prompt<TAB>completion
    data.write_text("".join(f"is {w} a colour?\tyes indeed\n" for w in ["red", "blue", "green", "black", "white"] * 4))
    config = write_config(tmp_path / "lm.yaml", **tiny_config(
        tiny_gpt2, data, tmp_path / "lm", task="causal_lm", method={"name": "lora", "r": 8, "alpha": 16,
                                                                    "target_modules": ["c_attn", "c_fc"]},
        epochs=10, batch_size=4))
    assert main(["train", str(config), "--quiet"]) == 0
    capsys.readouterr()
    prompts = ["is red a colour?", "is pink a colour?"]
    assert main(["predict", str(tmp_path / "lm"), *prompts, "--max-new-tokens", "6"]) == 0
    # the learned completion, and generation stops at the end-of-sequence token
    assert capsys.readouterr().out.splitlines() == ["yes indeed", "yes indeed"]


def test_info_reports_without_training_or_writing(tiny_bert, word_csv, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", **tiny_config(
        tiny_bert, word_csv, tmp_path / "out", optimizer={"groups": [{"params": "classifier", "lr": 0.1}]}))
    assert main(["info", str(config), "--method.r", "2"]) == 0
    out = capsys.readouterr().out
    # LoRA r=2 on query+value of 2 layers (4 x (32x2 + 2x32)) + the classifier head copy (32x3 + 3)
    assert "trainable params: 611 " in out
    assert "optimizer group 'default': 512 params, lr 0.03" in out
    assert "optimizer group 'classifier': 99 params, lr 0.1" in out
    assert "data: 42/15/15 train/valid/test examples, 3 labels" in out
    assert "encoder.layer.0.attention.self.query" in out  # the per-module table
    assert list(tmp_path.iterdir()) == [config]
    assert main(["info", "--methods"]) == 0
    assert "lora: " in capsys.readouterr().out


def _bad(tmp_path, tiny_bert, word_csv, **extra):
    return write_config(tmp_path / "bad.yaml", **tiny_config(tiny_bert, word_csv, tmp_path / "out", **extra))


@pytest.mark.parametrize("case", ["missing", "empty", "garbled", "binary", "label_column", "type", "target",
                                  "unknown_key", "fortunes", "model", "too_few"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_bert, word_csv, tmp_path, capsys):
    data = tmp_path / "d.csv"
    expect = {
        "missing": f"data file {data} does not exist",
        "empty": f"data file {data} is empty",
        "garbled": "line 2 does not have the 2 fields of the header ['text', 'label']",
        "binary": "not UTF-8 text",
        "label_column": "no label column 'topic'; columns are ['label', 'text'] (set data.label_column)",
        "type": "optimizer.lr: expected float, got str 'fast'",
        "target": "target_modules=['attn_out'] matched no module of BertForSequenceClassification",
        "unknown_key": "unknown config key 'data.max_lenght'; did you mean 'data.max_length'?",
        "fortunes": "install it with: sudo apt-get install -y fortunes fortunes-min",
        "model": "is neither a built-in model ('minilm', 'smollm2', 'mlp') nor a local folder with config.json",
        "too_few": "fewer than batch_size=64",
    }[case]
    extra: dict = {}
    if case in ("missing", "empty", "garbled", "binary", "label_column"):
        extra["data"] = {"train": str(data)}
        if case == "empty":
            data.write_text("")
        if case in ("garbled", "label_column"):
            data.write_text(word_csv.read_text().replace("\n", "\nextra,field,here\n", 2)[:400]
                            if case == "garbled" else word_csv.read_text())
        if case == "binary":
            data.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 20)
        if case == "label_column":
            extra["data"]["label_column"] = "topic"
    elif case == "type":
        extra["optimizer"] = {"lr": "fast"}
    elif case == "target":
        extra["method"] = {"name": "lora", "target_modules": ["attn_out"]}
    elif case == "unknown_key":
        extra["data"] = {"max_lenght": 64}
    elif case == "fortunes":
        extra["data"] = {"source": "fortunes", "directory": str(tmp_path / "no-fortunes"), "train": None}
    elif case == "model":
        extra["model"] = str(tmp_path / "no-model")
    elif case == "too_few":
        extra["batch_size"] = 64
    config = _bad(tmp_path, tiny_bert, word_csv, **extra)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["train", str(config), "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unipeft train: error: "), captured.err
    assert expect in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no .partial


def test_flags_after_the_config_and_eval_of_an_unfinished_run(tiny_bert, word_csv, tmp_path, capsys):
    config = _bad(tmp_path, tiny_bert, word_csv)
    assert main(["train", str(config), "--max_steps", "2", "--resume", "--quiet"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    (tmp_path / "out.partial").mkdir()
    assert main(["eval", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unipeft eval: error: ") and "holds an unfinished run" in err and "\n" not in err
