"""`unipeft merge`, `unipeft compress` and `unipeft extract-lora` end to end on tiny saved models."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import unipeft as up
from unipeft.cli import main
from unipeft.merge.adapters import merge_adapters

from ..interop._models import build, inputs


def _bert_folder(tmp_path):
    base = build("bert")
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _lora_folder(tmp_path, name: str, seed: int):
    model = up.adapt(build("bert"), up.LoraConfig(r=4, target_modules=["query", "value"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_merge_adapters_from_yaml_equals_the_library_call(tmp_path, capsys):
    base_dir = _bert_folder(tmp_path)
    a, a_dir = _lora_folder(tmp_path, "a", 1)
    _, b_dir = _lora_folder(tmp_path, "b", 2)
    cfg = {"base_model": str(base_dir), "merge_method": "ties", "parameters": {"density": 0.5},
           "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 adapters" in printed and "relative distance of the merged update to source_0" in printed
    # the same merge in the library
    a.load_adapter(b_dir, "b")
    expected = merge_adapters(a, ["default", "b"], [0.7, 0.3], "ties", name="m", density=0.5)
    got = up.AdaptedModel.from_pretrained(build("bert"), tmp_path / "out")
    a.set_adapter(expected)
    batch = inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(got(**batch).logits, a(**batch).logits, atol=0, rtol=0)


def test_merge_checkpoints_from_yaml(tmp_path, capsys):
    base_dir = _bert_folder(tmp_path)
    for i in (1, 2):
        m = build("bert")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        m.save_pretrained(tmp_path / f"ft{i}")
    cfg = {"base_model": str(base_dir), "merge_method": "task_arithmetic",
           "models": [{"model": str(tmp_path / "ft1"), "parameters": {"weight": 0.5}},
                      {"model": str(tmp_path / "ft2"), "parameters": {"weight": 0.5}}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "checkpoints by task_arithmetic" in capsys.readouterr().out
    merged, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    f1, f2 = load_file(tmp_path / "ft1" / "model.safetensors"), load_file(tmp_path / "ft2" / "model.safetensors")
    key = next(k for k in merged if k.endswith("query.weight"))
    torch.testing.assert_close(merged[key], b[key] + 0.5 * (f1[key] - b[key]) + 0.5 * (f2[key] - b[key]),
                               atol=1e-6, rtol=0)


def test_merge_refuses_bad_yaml_with_the_field_and_writes_nothing(tmp_path, capsys):
    _bert_folder(tmp_path)
    _lora_folder(tmp_path, "a", 1)
    cfg = {"base_model": "base", "merge_method": "nope", "models": [{"model": "a"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "out")]) == 2
    assert "merge_method" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_compress_and_load_back(tmp_path, capsys):
    _, a_dir = _lora_folder(tmp_path, "a", 1)
    assert main(["compress", str(a_dir), str(tmp_path / "c"), "--density", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "x smaller" in printed
    from unipeft.compress.compeft import load_compressed
    loaded = load_compressed(build("bert"), tmp_path / "c")
    assert loaded.peft_config["default"].r == 4
    assert main(["compress", str(a_dir), str(tmp_path / "d"), "--density", "1.5"]) == 2
    assert "density" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_extract_lora_of_a_low_rank_fine_tune(tmp_path, capsys):
    base_dir = _bert_folder(tmp_path)
    tuned = build("bert")
    torch.manual_seed(4)
    with torch.no_grad():
        w = tuned.bert.encoder.layer[0].attention.self.query.weight
        w.add_(torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) * 0.05)  # a rank-2 task vector
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["extract-lora", str(base_dir), str(tmp_path / "tuned"), str(tmp_path / "lora"), "--rank", "2",
                 "--no-progress"]) == 0
    assert "rank-2 LoRA of 1 layers" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    model = up.AdaptedModel.from_pretrained(build("bert"), tmp_path / "lora")
    batch = inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, tuned(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("verb", ["merge", "compress", "extract-lora"])
def test_help_explains_the_verb(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert "usage: unipeft " + verb in capsys.readouterr().out
