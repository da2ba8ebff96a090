"""The calibrate step of `unipeft train`: data-aware inits read N batches of the training split."""
from __future__ import annotations

import json

import pytest
import torch

import unipeft as up
from unipeft.cli import main
from unipeft.train.calibrate import calibration_batches
from unipeft.train.config import config_from_dict
from unipeft.train.setup import build_parts

from ._helpers import summary, tiny_config, write_config

CORDA = {"name": "lora", "r": 2, "alpha": 4, "init": "corda", "target_modules": ["query", "value"]}


def test_corda_run_trains_from_training_batches_and_eval_reloads_it(tiny_bert, word_csv, tmp_path, capsys):
    cfg = tiny_config(tiny_bert, word_csv, tmp_path / "run", method=CORDA, calibration={"batches": 2}, epochs=1)
    assert main(["train", str(write_config(tmp_path / "c.yaml", **cfg)), "--quiet"]) == 0
    run = tmp_path / "run"
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "corda" and saved["corda_config"]["corda_method"] == "ipm"
    assert "batches: 2" in (run / "config.yaml").read_text()
    # eval rebuilds the same calibration batches, so the base residual (and the test loss) is reproduced
    assert main(["eval", str(run)]) == 0
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert test["loss"] == pytest.approx(summary(run)["test"]["loss"], rel=1e-5)


def test_calibration_reads_only_the_training_split(tiny_bert, word_csv, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_bert, word_csv, tmp_path / "r", method=CORDA,
                                       calibration={"batches": 3, "batch_size": 4}))
    parts = build_parts(cfg)
    train = parts.encode("train")
    texts = {tuple(r["input_ids"]) for r in train.rows}
    others = {tuple(r["input_ids"]) for s in ("valid", "test") for r in parts.encode(s).rows} - texts
    batches = list(calibration_batches(cfg, train, parts.pad_id, "activations"))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    seen = {tuple(x[m.bool()].tolist()) for b in batches for x, m in zip(b["input_ids"], b["attention_mask"])}
    assert seen <= texts and not seen & others
    # the adapter was built from exactly these batches: the same init from them reproduces it
    base = parts.model.base_model
    d = parts.model.delta_at("default", "bert.encoder.layer.0.attention.self.query")
    assert isinstance(parts.model, up.AdaptedModel) and d.lora_A.weight.abs().sum() > 0
    again = build_parts(cfg).model.delta_at("default", "bert.encoder.layer.0.attention.self.query")
    assert torch.equal(d.lora_A.weight, again.lora_A.weight) and base is not None


def test_missing_calibration_section_names_the_field(tiny_bert, word_csv, tmp_path, capsys):
    cfg = tiny_config(tiny_bert, word_csv, tmp_path / "run", method=CORDA)
    assert main(["train", str(write_config(tmp_path / "c.yaml", **cfg)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "calibration: {batches:" in err and "corda" in err and not (tmp_path / "run").exists()
    bad = tiny_config(tiny_bert, word_csv, tmp_path / "run", method=CORDA, calibration={"batches": 0})
    with pytest.raises(up.ConfigError, match="calibration.batches"):
        config_from_dict(bad)
