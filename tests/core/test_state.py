"""Loading adapters that do not fit: AdapterLoadError naming the module, model left unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft as up
from unipeft.core.config import CONFIG_NAME
from unipeft.core.state import WEIGHTS_NAME

from ..invariants.cases import adapter_params, build_model, make_batch, module_types, no_adapter_modules, perturb, run


@pytest.fixture
def saved(tmp_path):
    """A perturbed LoRA r=2 adapter on fc1 and fc2 of the toy MLP, saved in tmp_path/'src'."""
    adapted = up.adapt(build_model("mlp"), up.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    perturb(adapted, "default", seed=1)
    adapted.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(folder, drop=(), add=None):
    path = folder / WEIGHTS_NAME
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(path))


def _host():
    """An adapted model holding one IA3 adapter, to load into."""
    adapted = up.adapt(build_model("mlp"), up.IA3Config(target_modules=["fc1"]))
    perturb(adapted, "default", seed=3)
    return adapted


def _snapshot(adapted, batch):
    return (module_types(adapted), sorted(adapted.peft_config), adapted.active_adapters, run(adapted, batch),
            {n: p.detach().clone() for n, p in adapted.state_dict().items()},
            {n for n, p in adapted.named_parameters() if p.requires_grad})


def _assert_same(adapted, batch, snap):
    types, names, active, out, state, grads = snap
    assert module_types(adapted) == types, "a failed load left modules behind"
    assert sorted(adapted.peft_config) == names and adapted.active_adapters == active
    assert adapted.state_dict().keys() == state.keys()
    for k, v in adapted.state_dict().items():
        assert torch.equal(v, state[k]), f"a failed load changed {k}"
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == grads
    torch.testing.assert_close(run(adapted, batch), out, rtol=0, atol=0)


def test_mismatched_rank_raises_naming_the_modules(saved):
    _edit_config(saved, r=3)
    host, batch = _host(), make_batch("mlp")
    snap = _snapshot(host, batch)
    with pytest.raises(up.AdapterLoadError, match=r"(?s)fc1: 'lora_A.weight' has shape \(2, 8\) in the file but "
                                                  r"the model expects \(3, 8\).*fc2"):
        host.load_adapter(saved, "other")
    _assert_same(host, batch, snap)


def test_missing_key_raises_naming_the_module(saved):
    _edit_tensors(saved, drop=["base_model.model.fc2.lora_B.weight"])
    host, batch = _host(), make_batch("mlp")
    snap = _snapshot(host, batch)
    with pytest.raises(up.AdapterLoadError, match=r"fc2: 'lora_B.weight' is missing from the file") as info:
        host.load_adapter(saved, "other")
    assert "fc1" not in str(info.value)
    _assert_same(host, batch, snap)


def test_unexpected_key_raises_naming_the_module(saved):
    _edit_tensors(saved, add={"base_model.model.norm.lora_A.weight": torch.zeros(2, 16)})
    host, batch = _host(), make_batch("mlp")
    snap = _snapshot(host, batch)
    with pytest.raises(up.AdapterLoadError, match=r"norm: unexpected key 'base_model.model.norm.lora_A.weight'"):
        host.load_adapter(saved, "other")
    _assert_same(host, batch, snap)


def test_corrupt_weights_file_raises_adapter_load_error(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    host, batch = _host(), make_batch("mlp")
    snap = _snapshot(host, batch)
    with pytest.raises(up.AdapterLoadError, match="cannot read safetensors"):
        host.load_adapter(saved, "other")
    _assert_same(host, batch, snap)


def test_load_under_an_existing_name_raises_and_changes_nothing(saved):
    host, batch = _host(), make_batch("mlp")
    snap = _snapshot(host, batch)
    with pytest.raises(up.ConfigError, match="already exists"):
        host.load_adapter(saved, "default")
    _assert_same(host, batch, snap)


@pytest.mark.parametrize("breakage", ["rank", "missing"])
def test_from_pretrained_failure_leaves_the_base_model_unadapted(saved, breakage):
    if breakage == "rank":
        _edit_config(saved, r=4)
    else:
        _edit_tensors(saved, drop=["base_model.model.fc1.lora_A.weight"])
    base = build_model("mlp")
    base.fc2.bias.requires_grad_(False)  # flags must come back exactly as they were
    batch = make_batch("mlp")
    types, out = module_types(base), run(base, batch)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(up.AdapterLoadError, match="fc1"):
        up.AdaptedModel.from_pretrained(base, saved)
    assert no_adapter_modules(base)
    assert module_types(base) == types
    assert {n for n, p in base.named_parameters() if not p.requires_grad} == {"fc2.bias"}
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k])
    torch.testing.assert_close(run(base, batch), out, rtol=0, atol=0)


def test_from_pretrained_missing_folder_raises(tmp_path):
    base = build_model("mlp")
    with pytest.raises(FileNotFoundError):
        up.AdaptedModel.from_pretrained(base, tmp_path / "nowhere")
    assert no_adapter_modules(base)


def test_is_trainable_sets_requires_grad(saved):
    host = _host()
    host.load_adapter(saved, "frozen")
    host.load_adapter(saved, "trainable", is_trainable=True)
    host.set_adapter(["frozen", "trainable"])
    assert not any(p.requires_grad for p in adapter_params(host, "frozen").values())
    assert all(p.requires_grad for p in adapter_params(host, "trainable").values())
    assert not any(p.requires_grad for p in adapter_params(host, "default").values())


def test_saved_tensors_are_fp32_and_named_like_peft(saved):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    assert sorted(tensors) == ["base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
                               "base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["base_model.model.fc1.lora_A.weight"].shape == (2, 8)
