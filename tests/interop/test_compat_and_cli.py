"""unipeft.compat runs a PEFT script after an import change; import/export verbs."""
from __future__ import annotations

import json
import subprocess
import tempfile
import sys
from pathlib import Path

import peft
import torch

import unipeft as up
from unipeft.cli import main as cli

from ._models import build, inputs, output

SCRIPT = Path(__file__).with_name("peft_style_train.py")


def _run_script(source: str, out_dir: Path):
    namespace: dict = {"__name__": "peft_style_train"}
    exec(compile(source, str(SCRIPT), "exec"), namespace)
    return namespace["main"](str(out_dir))


def test_peft_script_runs_on_compat_with_identical_results(tmp_path, capsys):
    # LoRA dropout draws its masks differently (one mask per group of sites sharing an input, from
    # 16-bit lanes: methods/lora/fused.py), so training is identical to PEFT's step for step
    # without dropout, and learns as well with it.
    source = SCRIPT.read_text()
    assert "from peft import" in source and "lora_dropout=0.1" in source
    exact = source.replace("lora_dropout=0.1", "lora_dropout=0.0")
    loss_peft, logits_peft = _run_script(exact, tmp_path / "peft")
    ported = exact.replace("from peft import", "from unipeft.compat import")
    loss_ours, logits_ours = _run_script(ported, tmp_path / "ours")
    assert "trainable params:" in capsys.readouterr().out
    assert abs(loss_ours - loss_peft) < 1e-5 and loss_ours < 0.5  # it learned (starts near ln 2 = 0.69), the same way
    torch.testing.assert_close(logits_ours, logits_peft, atol=1e-5, rtol=1e-5)
    loss_peft_drop, _ = _run_script(source, tmp_path / "peft-dropout")
    loss_ours_drop, _ = _run_script(source.replace("from peft import", "from unipeft.compat import"),
                                    tmp_path / "ours-dropout")
    assert loss_ours_drop < 0.5 and loss_peft_drop < 0.5
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg_ours["modules_to_save"] == cfg_peft["modules_to_save"] == ["classifier", "score"]


def _peft_adapter(tmp_path: Path) -> Path:
    pm = peft.get_peft_model(build("bert"), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    pm.save_pretrained(tmp_path / "from_peft")
    return tmp_path / "from_peft"


def test_import_and_export_verbs_round_trip(tmp_path, capsys):
    src = _peft_adapter(tmp_path)
    assert cli(["import", "--from", "peft", str(src), str(tmp_path / "ours")]) == 0
    assert cli(["export", "--to", "peft", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert "wrote LORA adapter (8 tensors)" in capsys.readouterr().out
    pm = peft.PeftModel.from_pretrained(build("bert"), tmp_path / "back").eval()
    ours = up.AdaptedModel.from_pretrained(build("bert"), tmp_path / "ours").eval()
    batch = inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(output(ours, batch), output(pm, batch), atol=1e-6, rtol=1e-6)


def test_export_of_a_method_peft_lacks_is_one_clear_error(tmp_path, capsys):
    model = up.adapt(build("bert"), up.BitFitConfig())
    model.save_pretrained(tmp_path / "bitfit")
    assert cli(["export", "--to", "peft", str(tmp_path / "bitfit"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bitfit" in err[0] and "no PEFT equivalent" in err[0]
    assert not (tmp_path / "out").exists()


def test_import_of_a_broken_folder_fails_cleanly(tmp_path, capsys):
    src = _peft_adapter(tmp_path)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    assert cli(["import", "--from", "peft", str(src), str(tmp_path / "ours")]) == 2
    assert "lora_bias" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()
    assert cli(["import", "--from", "peft", str(tmp_path / "nowhere"), str(tmp_path / "ours")]) == 2


def test_cli_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "unipeft.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "import" in out.stdout and "export" in out.stdout


def test_import_and_export_verbs_carry_prompt_learning_folders(tmp_path):
    """PEFT's prompt tuning keeps `prompt_embeddings` at the file root: the verbs accept and keep it."""
    pm = peft.get_peft_model(build("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.add_(0.5)
    pm.save_pretrained(tmp_path / "from_peft")
    assert cli(["import", "--from", "peft", str(tmp_path / "from_peft"), str(tmp_path / "ours")]) == 0
    assert cli(["export", "--to", "peft", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    batch = inputs("gpt2")
    ours = up.AdaptedModel.from_pretrained(build("gpt2"), tmp_path / "ours").eval()
    back = peft.PeftModel.from_pretrained(build("gpt2"), tmp_path / "back").eval()
    with torch.no_grad():
        theirs = back(**batch).logits[:, 3:]  # peft also returns the virtual positions
        torch.testing.assert_close(ours(**batch).logits, theirs, atol=1e-5, rtol=1e-5)
        assert (theirs - build("gpt2")(**batch).logits).abs().max() > 1e-3  # the prompt is really applied


def test_compat_prompt_configs_take_peft_field_names_and_match_peft():
    from unipeft import compat

    kw = dict(task_type=compat.TaskType.CAUSAL_LM, num_virtual_tokens=3)
    pairs = [(compat.PromptTuningConfig(prompt_tuning_init=peft.PromptTuningInit.RANDOM, **kw),
              peft.PromptTuningConfig(**kw)),
             (compat.PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw)),
             (compat.PromptEncoderConfig(encoder_reparameterization_type=peft.PromptEncoderReparameterizationType.MLP,
                                         encoder_hidden_size=8, **kw),
              peft.PromptEncoderConfig(encoder_hidden_size=8, **kw))]
    batch = inputs("gpt2")
    for ours_cfg, peft_cfg in pairs:
        theirs = peft.get_peft_model(build("gpt2"), peft_cfg).eval()
        with torch.no_grad():  # move every trainable tensor off its init so equality means something
            g = torch.Generator().manual_seed(0)
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ours = compat.get_peft_model(build("gpt2"), ours_cfg)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            loaded = compat.PeftModel.from_pretrained(build("gpt2"), tmp).eval()
        with torch.no_grad():
            expected = theirs(**batch).logits[:, -batch["input_ids"].shape[1]:]
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
