"""The trainer on tiny models: run folder, PEFT format, metrics, learning, accumulation, callbacks, tasks."""
from __future__ import annotations

import json

import pytest
import torch

from unipeft.train import TrainerCallback, config_from_dict, train_run
from unipeft.train.artifacts import load_run

from ._helpers import adapter_tensors, summary, tiny_config


def _run(cfg: dict, **kwargs):
    return train_run(config_from_dict(cfg), show_progress=False, log=lambda *_: None, **kwargs)


@pytest.fixture(scope="module")
def lora_run(tiny_bert, word_csv, tmp_path_factory):
    """One finished LoRA run on the word task (3 epochs)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    _run(tiny_config(tiny_bert, word_csv, out, eval_every=2))
    return out


def test_run_folder_metrics_and_summary(lora_run):
    assert sorted(p.name for p in lora_run.iterdir()) == ["adapter", "config.yaml", "metrics.jsonl", "summary.json"]
    assert not lora_run.with_name("lora.partial").exists()
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    test = [r for r in records if r.get("split") == "test"]
    assert [r["step"] for r in train] == list(range(2, 16, 2)) + [15]  # log_every 2, and the last step
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and "lr" in r and "grad_norm" in r for r in train)
    assert [r["step"] for r in valid] == list(range(2, 16, 2)) + [15]  # eval_every 2, and the last step
    assert all(set(r) >= {"accuracy", "macro_f1", "loss"} for r in valid)
    s = summary(lora_run)
    assert s["status"] == "complete" and s["steps"] == 15 and s["examples"] == {"train": 42, "valid": 15, "test": 15}
    assert s["test"] == {k: pytest.approx(v, abs=1e-6) for k, v in test[0].items() if k not in ("step", "split")}
    assert s["label_names"] == ["cars", "fruit", "space"]
    # it learned: the word task is easy once trained (chance is 1/3)
    assert s["test"]["accuracy"] >= 0.8 and train[-1]["loss"] < 0.7 * train[0]["loss"]


def test_adapter_is_peft_format_and_loads_in_peft(lora_run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    conf = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "SEQ_CLS" and conf["r"] == 4
    keys = set(adapter_tensors(lora_run))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    run = load_run(lora_run)
    batch = run.tokenizer(["apple banana pear", "rocket orbit comet moon"], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3,
                                                              ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    with torch.no_grad():
        ours = run.model(**batch).logits
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.argmax(-1).tolist() == [run.label_names.index("fruit"), run.label_names.index("space")]


@pytest.mark.parametrize("variant", [{"grad_accum": 4}, {"gradient_checkpointing": True}])
def test_accumulation_and_checkpointing_give_the_same_adapter(tiny_bert, word_csv, tmp_path, variant):
    base = {"max_steps": 4, "eval_every": 100}
    _run(tiny_config(tiny_bert, word_csv, tmp_path / "plain", **base))
    seen = []

    class Probe(TrainerCallback):
        def on_train_begin(self, ctx):
            seen.append(ctx.model.base_model.is_activation_checkpointing)

    _run(tiny_config(tiny_bert, word_csv, tmp_path / "other", **base, **variant), callbacks=[Probe()])
    assert seen == [bool(variant.get("gradient_checkpointing"))]
    a, b = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "other")
    assert a.keys() == b.keys()
    moved = a["base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight"]
    assert moved.abs().max() > 1e-3  # training did change the adapter, so the comparison means something
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


class Recorder(TrainerCallback):
    """Records hook order, clipped gradient norms and group learning rates; stops after `stop_at` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[str] = []
        self.norms: list[float] = []
        self.lrs: list[list[float]] = []
        self.stop_at = stop_at

    def on_train_begin(self, ctx):
        self.events.append("begin")

    def on_step_begin(self, ctx):
        self.events.append(f"step{ctx.step + 1}")

    def on_before_optimizer_step(self, ctx):
        grads = [p.grad for p in ctx.model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.lrs.append([g["lr"] for g in ctx.optimizer.param_groups])
        self.events.append("opt")

    def on_step_end(self, ctx):
        self.events.append("end")
        if self.stop_at is not None and ctx.step >= self.stop_at:
            ctx.should_stop = True

    def on_evaluate(self, ctx, metrics):
        self.events.append("eval")

    def on_train_end(self, ctx):
        self.events.append("done")


def test_callbacks_order_clipping_groups_and_stop(tiny_bert, word_csv, tmp_path):
    rec = Recorder(stop_at=3)
    cfg = tiny_config(tiny_bert, word_csv, tmp_path / "cb", max_grad_norm=0.01, eval_every=2,
                      optimizer={"groups": [{"params": "classifier", "lr": 0.3}]},
                      schedule={"name": "linear", "warmup_steps": 1})
    s = _run(cfg, callbacks=[rec])
    assert rec.events == ["begin", "step1", "opt", "end", "step2", "opt", "end", "eval", "step3", "opt", "end",
                          "eval", "done"]  # a stopped run is evaluated at its last step
    assert s["steps"] == 3
    assert max(rec.norms) <= 0.01 * (1 + 1e-4)  # clipped before the callback sees them
    # group 0: default lr 3e-2, group 1: classifier 0.3; warm-up 1 step then linear decay over 15 steps
    assert rec.lrs[0] == pytest.approx([0.015, 0.15])
    assert rec.lrs[1] == pytest.approx([0.03, 0.3])
    assert rec.lrs[2] == pytest.approx([0.03 * 13 / 14, 0.3 * 13 / 14])


def test_method_hooks_add_callbacks_and_groups(tiny_bert, word_csv, tmp_path, monkeypatch):
    """The interface other methods use: config.training_callbacks(model, name) and config.optimizer_groups(name)."""
    from unipeft.core.model import AdaptedModel
    from unipeft.methods.lora import LoraConfig

    rec = Recorder()
    seen = {}

    def training_callbacks(self, model, adapter_name):
        seen["model"], seen["name"] = model, adapter_name
        return [rec]

    monkeypatch.setattr(LoraConfig, "training_callbacks", training_callbacks, raising=False)
    monkeypatch.setattr(LoraConfig, "optimizer_groups", lambda self, name: [{"params": r"lora_B", "lr": 0.05}],
                        raising=False)
    _run(tiny_config(tiny_bert, word_csv, tmp_path / "hooks", max_steps=2, schedule={"name": "constant"}))
    assert isinstance(seen["model"], AdaptedModel) and seen["name"] == "default"
    assert rec.events[:4] == ["begin", "step1", "opt", "end"]
    assert rec.lrs[0] == pytest.approx([0.03, 0.05])  # default group, then the method's lora_B group


@pytest.mark.parametrize("method", [
    {"name": "ia3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
    {"name": "bitfit"},
    {"name": "ln_tuning"},
    {"name": "full", "trainable": ["^classifier\\."]},
])
def test_other_methods_train_and_reload(tiny_bert, word_csv, tmp_path, method):
    out = tmp_path / "run"
    s = _run(tiny_config(tiny_bert, word_csv, out, method=method, max_steps=3, optimizer={"lr": 1e-2}))
    assert s["trainable_params"] > 0 and s["steps"] == 3
    run = load_run(out)
    batch = run.tokenizer(["apple pear", "engine brake gear"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = run.model(**batch).logits
    eval_acc = summary(out)["test"]["accuracy"]
    from unipeft.train.artifacts import eval_splits
    from unipeft.data.encode import encode_split
    from unipeft.train.evaluate import evaluate
    enc = encode_split(run.tokenizer, eval_splits(run).test, run.cfg.data.max_length)
    assert evaluate(run.model, enc, "classification", 8, 0, 3)["accuracy"] == pytest.approx(eval_acc)
    assert logits.shape == (2, 3)
    if method["name"] == "full":
        assert (out / "trainable.safetensors").is_file() and not (out / "adapter").exists()


def test_causal_lm_learns_completions_only(tiny_gpt2, tmp_path):
    pairs = [(f"Q: colour of {w}? A:", f" {c}") for w, c in
             [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
              ("sun", "yellow"), ("night", "dark"), ("milk", "white")]] * 3
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "lm", task="causal_lm", data={"split": [0.8, 0.1, 0.1]},
                      method={"name": "lora", "r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]},
                      epochs=8, batch_size=4, eval_every=100)
    s = _run(cfg)
    records = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert set(s["test"]) == {"loss", "perplexity", "token_accuracy", "examples"}
    assert s["test"]["perplexity"] == pytest.approx(2.718281828 ** s["test"]["loss"], rel=1e-4)
    assert json.loads((tmp_path / "lm" / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_causal_loss_counts_completion_tokens_only():
    from unipeft.data.encode import IGNORE
    from unipeft.train.evaluate import loss_terms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 6, 0]])
    got = loss_terms("causal_lm", logits, labels)
    lp = logits.log_softmax(-1)
    # position t predicts token t+1; prompt (IGNORE) and padding targets carry no loss
    want0 = -(lp[0, 1, 3] + lp[0, 2, 4])
    want1 = -(lp[1, 0, 1] + lp[1, 1, 2] + lp[1, 2, 6] + lp[1, 3, 0])
    torch.testing.assert_close(got, torch.stack([want0, want1]))


def test_digits_with_the_builtin_mlp(tmp_path):
    cfg = {"model": "mlp", "data": {"source": "digits"}, "output_dir": str(tmp_path / "digits"), "threads": 1,
           "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["fc1", "fc2"]},
           "optimizer": {"lr": 1e-2}, "epochs": 3, "batch_size": 32, "log_every": 20}
    s = _run(cfg)
    assert sum(s["examples"].values()) == 1797 and s["examples"]["test"] == pytest.approx(0.15 * 1797, abs=10)
    assert s["test"]["accuracy"] > 0.75  # chance is 0.1


def test_fortunes_source_with_chosen_categories(tiny_bert, fake_fortunes, tmp_path):
    cfg = tiny_config(tiny_bert, fake_fortunes, tmp_path / "f", max_steps=2,
                      data={"source": "fortunes", "directory": str(fake_fortunes), "categories": ["space", "fruit"],
                            "split": [0.5, 0.25, 0.25], "train": None})
    s = _run(cfg)
    assert s["label_names"] == ["space", "fruit"] and s["examples"] == {"train": 20, "valid": 10, "test": 10}
