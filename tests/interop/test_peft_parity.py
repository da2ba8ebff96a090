"""Parity with the installed `peft` package: same weights -> same outputs, gradients, merged weights."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

import unipeft as up

from ._models import build, inputs, output
from ._parity import assert_same_merge, output_loss

TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "bert-lora-qv": ("bert", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-dora-rslora-patterns-head": ("bert", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["query", "value", "dense"],
        rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 3},
        modules_to_save=["classifier"])),
    "bert-ia3": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                feedforward_modules=["output.dense"])),
    "bert-ln-tuning": ("bert", lambda: peft.LNTuningConfig(target_modules=["LayerNorm"])),
    "gpt2-lora-conv1d-embedding": ("gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=16,
                                                                   target_modules=["c_attn", "c_fc", "wte"])),
    "gpt2-dora": ("gpt2", lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=["c_attn", "c_proj"])),
    "gpt2-ia3": ("gpt2", lambda: peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])),
    "llama-lora-all-linear": ("llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-dora-layers": ("llama", lambda: peft.LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "v_proj"],
                                                           layers_to_transform=[1])),
    "conv-lora": ("conv", lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])),
}


def _loss(model, kind: str, batch: dict) -> torch.Tensor:
    return output_loss(output(model, batch))


def _train_peft(kind: str, make_config, steps: int = 3) -> peft.PeftModel:
    """An adapter trained by PEFT itself (a few AdamW steps), so no parameter sits at its init."""
    model = peft.get_peft_model(build(kind), make_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        _loss(model, kind, inputs(kind, seed=10 + step)).backward()
        opt.step()
    return model.eval()


def _grads_by_saved_key(model, saved: dict) -> dict[str, torch.Tensor]:
    """Map on-disk key -> grad, for a PEFT model or a unipeft model, by matching tensors by value."""
    by_value = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            by_value[name] = p
    out = {}
    for key, tensor in saved.items():
        hits = [p for p in by_value.values() if p.shape == tensor.shape and torch.equal(p.detach(), tensor)]
        assert len(hits) == 1, f"cannot identify the parameter saved as {key}"
        out[key] = hits[0].grad
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_identical_outputs_grads_and_merge(case, tmp_path):
    kind, make_config = CASES[case]
    pm = _train_peft(kind, make_config)
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path, is_trainable=True).eval()
    batch = inputs(kind, seed=99)

    with torch.no_grad():
        torch.testing.assert_close(output(ours, batch), output(pm, batch), **TOL)

    # Same loss -> same gradient for every saved tensor.
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for model in (pm, ours):
        model.zero_grad()
        _loss(model, kind, batch).backward()
    g_peft, g_ours = _grads_by_saved_key(pm, saved), _grads_by_saved_key(ours, saved)
    assert g_peft.keys() == g_ours.keys() and g_ours
    for key in g_peft:
        torch.testing.assert_close(g_ours[key], g_peft[key], **TOL, msg=f"gradient of {key}")

    if case == "gpt2-lora-conv1d-embedding":  # wte is tied to lm_head: merging is refused by design
        with pytest.raises(up.MergeError, match="tied"):
            ours.merge()
        return
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_unipeft_adapter_loads_in_peft_without_warnings(case, tmp_path):
    kind, make_config = CASES[case]
    config = up.AdapterConfig.from_dict({**make_config().to_dict()})  # PEFT's own dict -> our config
    ours = up.adapt(build(kind), config)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        _loss(ours, kind, inputs(kind, seed=20 + step)).backward()
        opt.step()
    ours.eval().save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    noisy = [str(w.message) for w in caught
             if any(s in str(w.message) for s in ("missing", "Unexpected", "unexpected", "fan_in_fan_out"))]
    assert not noisy, noisy
    # PEFT ignores unexpected keys silently; its loader's report must be empty too.
    result = set_peft_model_state_dict(pm, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k or "ia3" in k or "ln_tuning" in k]
    batch = inputs(kind, seed=98)
    with torch.no_grad():
        torch.testing.assert_close(output(pm, batch), output(ours, batch), **TOL)


@pytest.mark.slow
def test_minilm_lora_and_dora_parity(tmp_path):
    for i, make in enumerate([
        lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        lambda: peft.LoraConfig(r=4, use_dora=True, target_modules="all-linear"),
    ]):
        pm = _train_peft("minilm", make, steps=2)
        pm.save_pretrained(tmp_path / str(i))
        ours = up.AdaptedModel.from_pretrained(build("minilm"), tmp_path / str(i)).eval()
        batch = inputs("minilm", seed=5)
        with torch.no_grad():
            torch.testing.assert_close(output(ours, batch), output(pm, batch), **TOL)
            merged_ours = ours.merge_and_unload().state_dict()
            merged_peft = pm.merge_and_unload().state_dict()
        for key in merged_peft:
            torch.testing.assert_close(merged_ours[key], merged_peft[key], **TOL, msg=key)


def test_unknown_peft_method_and_field_are_clear_errors(tmp_path):
    with pytest.raises(up.ConfigError, match=r"unknown peft_type 'NOT_A_TUNER'.*LORA"):
        up.AdapterConfig.from_dict({"peft_type": "NOT_A_TUNER", "r": 4})
    with pytest.raises(up.ConfigError, match=r"field 'lora_bias'=True.*supported fields.*lora_alpha"):
        up.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_bias": True})
    with pytest.raises(up.ConfigError, match=r"field 'brand_new_knob'=3"):
        up.AdapterConfig.from_dict({"peft_type": "LORA", "brand_new_knob": 3})
    with pytest.warns(UserWarning, match="brand_new_flag"):
        cfg = up.AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "brand_new_flag": None})
    assert cfg.r == 4
    # PEFT's own defaults for fields we do not model load silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        up.AdapterConfig.from_dict(peft.LoraConfig(r=4, target_modules=["q"]).to_dict())
