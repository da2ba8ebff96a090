"""QLoRA through the command line: `unipeft train` on a 4-bit / 8-bit base with gradient checkpointing,
then `unipeft eval` and `unipeft generate` on the run folder (the quantized base is rebuilt)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from unipeft.cli import main  # noqa: E402
from unipeft.train.artifacts import load_run  # noqa: E402
from unipeft.train.generate import generate  # noqa: E402

from ._helpers import make_tiny_gpt2, tiny_config, write_config  # noqa: E402

COLOURS = ["red", "blue", "green", "black", "white"]


@torch.no_grad()
def answer_loss(run) -> float:
    """Mean loss of the answer tokens of one unseen prompt."""
    from unipeft.data.encode import collate, encode_prompt_completion

    ids, labels = encode_prompt_completion(run.tokenizer, "is pink a colour?", "yes indeed", 32)
    batch = collate([{"input_ids": ids, "labels": labels}], run.tokenizer.pad_token_id)
    return float(run.model(**batch).loss)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    model = make_tiny_gpt2(tmp / "gpt2")
    data = tmp / "pairs.txt"
    data.write_text("".join(f"is {w} a colour?\tyes indeed\n" for w in COLOURS * 4))
    return tmp, model, data


@pytest.mark.parametrize("bits", [4, 8])
def test_train_eval_generate_on_a_quantized_base(model_and_data, bits, capsys):
    tmp, model, data = model_and_data
    out = tmp / f"run{bits}"
    config = write_config(tmp / f"q{bits}.yaml", **tiny_config(
        model, data, out, task="causal_lm", quantization={"bits": bits}, gradient_checkpointing=True,
        method={"name": "lora", "r": 8, "alpha": 16, "target_modules": ["c_attn", "c_fc"]}, epochs=10,
        batch_size=4))
    assert main(["train", str(config), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["token_accuracy"] == 1.0, summary["test"]  # the answer is learned on a quantized base
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["generated"] == "yes indeed" for s in samples)
    run = load_run(out)
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    assert type(run.model.base_model.transformer.h[0].mlp.c_proj).__name__ == kind  # reloaded quantized
    assert generate(run.model, run.tokenizer, ["is pink a colour?"], max_new_tokens=6) == ["yes indeed"]
    with run.model.disable_adapter():
        base_loss = answer_loss(run)
    assert answer_loss(run) < 0.5 * base_loss  # measured: 3.04 vs 12.16 (4-bit), 3.07 vs 12.17 (8-bit)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed


def test_quantized_and_full_precision_runs_learn_alike(model_and_data):
    """Same data and steps: the NF4 run's test loss is within 5% of the fp32 run's."""
    tmp, model, data = model_and_data
    losses = {}
    for name, quant in (("fp32", {"bits": None}), ("nf4", {"bits": 4})):
        out = tmp / f"cmp-{name}"
        config = write_config(tmp / f"cmp-{name}.yaml", **tiny_config(
            model, data, out, task="causal_lm", quantization=quant, epochs=10, batch_size=4,
            method={"name": "lora", "r": 8, "alpha": 16, "target_modules": ["c_attn", "c_fc"]}))
        assert main(["train", str(config), "--quiet"]) == 0
        losses[name] = json.loads((out / "summary.json").read_text())["test"]["loss"]
    assert abs(losses["nf4"] - losses["fp32"]) < 0.05 * losses["fp32"], losses  # measured: 3.039 vs 3.061
