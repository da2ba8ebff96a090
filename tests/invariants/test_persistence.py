"""Save/load invariants: identical outputs after a round trip; adapter names never reach the file."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import unipeft as up
from unipeft.core.bank import bank_keys

from .cases import (adapt_case, adapter_params, build_model, differs, loading, make_batch, parametrize_cases,
                    parametrize_kinds, perturb, run)


def _saved(case, kind, tmp_path, name="default"):
    model = build_model(kind)
    batch = make_batch(kind)
    adapted = adapt_case(case, kind, model, name)
    perturb(adapted, name, seed=1)
    out = run(adapted, batch)
    adapted.save_pretrained(tmp_path)
    return adapted, batch, out


@parametrize_cases
@parametrize_kinds
def test_save_load_gives_identical_outputs(case, kind, tmp_path):
    adapted, batch, out = _saved(case, kind, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # A fresh base built under another seed, given the same base weights: the adapter's own
    # initialisation draws different random numbers, so equality shows every tensor was loaded.
    fresh = build_model(kind, seed=1)
    fresh.load_state_dict(build_model(kind, seed=0).state_dict())
    torch.manual_seed(1234)
    with loading(case, kind):
        loaded = up.AdaptedModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(run(loaded, batch), out, rtol=0, atol=0)
    saved = adapter_params(adapted, "default")
    got = adapter_params(loaded, "default")
    assert saved.keys() == got.keys()
    for k in saved:
        assert torch.equal(saved[k], got[k]), f"{k} differs after loading"
    assert not any(p.requires_grad for p in got.values()), "is_trainable=False must freeze the adapter"


@parametrize_cases
@parametrize_kinds
def test_load_on_other_base_weights_loads_the_same_tensors(case, kind, tmp_path):
    adapted, batch, out = _saved(case, kind, tmp_path)
    other = build_model(kind, seed=1)  # different base weights
    other_out = run(other, batch)
    with loading(case, kind):
        loaded = up.AdaptedModel.from_pretrained(other, tmp_path, is_trainable=True)
    saved_sd = adapted.adapter_state_dict()
    loaded_sd = loaded.adapter_state_dict()
    assert saved_sd.keys() == loaded_sd.keys()
    for k in saved_sd:
        assert torch.equal(saved_sd[k], loaded_sd[k]), f"{k} differs after loading"
    assert all(p.requires_grad for p in adapter_params(loaded, "default").values())
    assert differs(run(loaded, batch), other_out), "the loaded adapter does nothing"


@parametrize_cases
@parametrize_kinds
def test_adapter_name_never_in_saved_keys_and_any_name_loads(case, kind, tmp_path):
    name = "zq_custom_name7"
    adapted, batch, out = _saved(case, kind, tmp_path, name=name)
    folder = tmp_path / name  # non-default adapters are saved in a sub-folder
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert keys
    # Site keys live under the method's prefix; PEFT's prompt methods (which declare their own
    # state_prefix) also keep file-level keys such as `prompt_embeddings`.
    # A shared bank's tensors sit at the file root under the names its Bank gives them (PEFT's
    # `base_model.vblora_vector_bank`).
    prefix = case.spec.config_cls.state_prefix
    bank = set(bank_keys(adapted.banks[name])) if name in adapted.banks else set()
    assert all(k.startswith(prefix) or k in bank or not k.startswith("base_model") for k in keys), keys
    assert not [k for k in keys if name in k], f"the adapter name leaked into saved keys: {keys}"
    assert name not in (folder / "adapter_config.json").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == case.spec.config_cls.peft_type

    # Load under other names: into a model that already holds another adapter, and from_pretrained.
    other = build_model(kind)
    host = adapt_case(case, kind, other, "first")
    with loading(case, kind):
        host.load_adapter(folder, "renamed")
    host.set_adapter("renamed")
    torch.testing.assert_close(run(host, batch), out, rtol=0, atol=0)
    assert sorted(host.peft_config) == ["first", "renamed"]

    with loading(case, kind):
        loaded = up.AdaptedModel.from_pretrained(build_model(kind), folder, adapter_name="x")
    assert loaded.active_adapters == ["x"]
    torch.testing.assert_close(run(loaded, batch), out, rtol=0, atol=0)
