"""Configs are immutable after adapt: the user's object is never written, the stored copy is frozen."""
from __future__ import annotations

import copy

import pytest

import unipeft as up

from .cases import MODEL_KINDS, applicable, build_model, calibration_batches, make_config, parametrize_cases


def _kind(case):
    kinds = [k for k in MODEL_KINDS if applicable(case, k)]
    assert kinds, f"{case.id} fits no toy model"
    return kinds[-1]  # the largest applicable model: most fields to resolve (widths, heads, Conv1D)


@parametrize_cases
def test_adapt_never_writes_the_users_config(case):
    kind = _kind(case)
    cfg = make_config(case, kind)
    before = copy.deepcopy(cfg.__dict__)
    data = calibration_batches(case, kind)
    model = up.adapt(build_model(kind), cfg, calibration=data)
    model.add_adapter("second", cfg, calibration=data)
    assert cfg.__dict__ == before, "adapt() wrote into the config object it was given"
    stored = model.peft_config["default"]
    assert stored is not cfg and stored is not model.peft_config["second"]
    assert type(stored) is type(cfg)
    with pytest.raises(up.ConfigError, match="immutable"):
        stored.target_modules = ["x"]
    # The stored copy is what gets saved; it re-validates and round-trips through JSON.
    again = up.AdapterConfig.from_dict(stored.to_dict())
    assert again.to_dict() == stored.to_dict()


def test_resolved_fields_land_in_the_stored_copy_only():
    cfg = up.LoraConfig(r=2, target_modules=["c_attn"])
    model = up.adapt(build_model("gpt2"), cfg)
    assert cfg.fan_in_fan_out is False
    assert model.peft_config["default"].fan_in_fan_out is True  # GPT-2's Conv1D, as PEFT records it
    prompt = up.PromptTuningConfig(num_virtual_tokens=3)
    adapted = up.adapt(build_model("llama"), prompt)
    assert prompt.token_dim is None and prompt.num_layers is None
    stored = adapted.peft_config["default"]
    assert (stored.token_dim, stored.num_layers, stored.num_attention_heads) == (16, 2, 2)


def test_replace_returns_an_unfrozen_validated_copy():
    model = up.adapt(build_model("mlp"), up.LoraConfig(r=2, target_modules=["fc1"]))
    changed = model.peft_config["default"].replace(r=4)
    changed.alpha = 3  # a new object: free to edit before it is used
    assert changed.r == 4 and model.peft_config["default"].r == 2
    with pytest.raises(up.ConfigError, match=r"LoraConfig\.r"):
        model.peft_config["default"].replace(r=0)
