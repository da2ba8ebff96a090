"""End to end on the real MiniLM and the real fortunes: the shipped example config, a few steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unipeft.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fortunes_lora.yaml"


@pytest.mark.slow
def test_example_config_trains_minilm_a_few_steps(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(EXAMPLE), "--quiet", "--output_dir", str(out), "--max_steps", "6",
                 "--data.max_per_category", "12", "--batch_size", "8", "--threads", "1", "--eval_every", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy " in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "minilm" and s["steps"] == 6 and len(s["label_names"]) == 8
    assert s["trainable_percent"] < 5  # LoRA: a small fraction of MiniLM's 22.7M parameters
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and set(conf["target_modules"]) == {"query", "key", "value", "dense"}
    assert main(["predict", str(out), "The compiler crashed again on the new kernel."]) == 0
    label = capsys.readouterr().out.split("\t")[0]
    assert label in s["label_names"]
