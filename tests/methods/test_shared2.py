"""Newer shared-basis methods (PVeRA, FRoD, UniLoRA, TinyLoRA): identity at init, merge, exact save/load,
seed mismatches refused without touching the model, sampling only where the method samples."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft as up
from tests.interop._models import build, inputs, output
from tests.interop._parity import TOL

from ._helpers import assert_merge_unmerge_and_reload, assert_seed_mismatch_refused, trained_bert

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]  # 32x32, 32->40, 40->32 in the tiny BERT

CONFIGS = {
    "pvera": lambda: up.PveraConfig(r=8, target_modules=TARGETS, save_projection=False),
    "pvera-saved": lambda: up.PveraConfig(r=8, target_modules=TARGETS),
    "frod": lambda: up.FrodConfig(target_modules=TARGETS, sparse_rate=0.05, save_projection=False),
    "frod-saved": lambda: up.FrodConfig(target_modules=TARGETS, sparse_rate=0.05),
    "unilora": lambda: up.UniLoraConfig(r=4, theta_d_length=64, target_modules=TARGETS),
    "unilora-saved": lambda: up.UniLoraConfig(r=4, theta_d_length=64, target_modules=TARGETS, save_indices=True),
    "tinylora": lambda: up.TinyLoraConfig(r=2, u=4, weight_tying=0.5, save_projection=False,
                                          target_modules=TARGETS + ["word_embeddings"]),
    "tinylora-saved": lambda: up.TinyLoraConfig(r=2, u=4, target_modules=TARGETS + ["word_embeddings"]),
}
# Methods whose init is not the identity (a random shared vector from the start).
NOT_IDENTITY = {"unilora"}
# name -> (config class, seed field) for the files whose stored bases must match the seed.
SEEDED = {"pvera-saved": "projection_prng_key", "frod-saved": "projection_prng_key", "unilora-saved": "proj_seed",
          "tinylora-saved": "projection_seed"}


def _trained(name: str) -> up.AdaptedModel:
    return trained_bert(CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_is_the_identity_where_the_method_says_so(name):
    batch = inputs("bert", seed=3)
    base = build("bert")
    with torch.no_grad():
        expected = output(base, batch)
        model = up.adapt(base, CONFIGS[name]())
        got = output(model, batch)
    method = name.split("-")[0]
    assert up.get_method(method).delta_cls.identity_at_init is (method not in NOT_IDENTITY)
    if method in NOT_IDENTITY:  # small (theta_d starts in +-0.02) but not zero
        assert (got - expected).abs().max() > 0
        assert all(d.delta_weight()["weight"].abs().max() > 1e-5 for d in model.deltas("default"))
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_equals_unmerged_and_save_load_exact(name, tmp_path):
    assert_merge_unmerge_and_reload(_trained(name), tmp_path, moved=1e-5)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_seed_mismatch_is_one_error_naming_the_field_and_changes_nothing(name, tmp_path):
    _trained(name).save_pretrained(tmp_path)
    assert_seed_mismatch_refused(tmp_path, type(CONFIGS[name]()).__name__, SEEDED[name])


def test_pvera_samples_in_training_mode_and_uses_the_mean_in_eval():
    model = _trained("pvera")
    batch = inputs("bert", seed=4)
    with torch.no_grad():
        mean = output(model, batch)
        torch.testing.assert_close(output(model, batch), mean, rtol=0, atol=0)
        for delta in model.deltas("default"):  # only the deltas: the base's dropout stays off
            delta.train()
        a, b = output(model, batch), output(model, batch)
    assert (a - b).abs().max() > 1e-6 and (a - mean).abs().max() > 1e-6
    # Merging keeps the mean: the merged eval model equals the unmerged eval model.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(output(model, batch), mean, rtol=0, atol=0)
        model.merge()
        torch.testing.assert_close(output(model, batch), mean, **TOL)


def test_frod_rebuilds_u_and_lambda_0_from_a_stored_basis(tmp_path):
    """A file's V wins over the regenerated one: each site's U and lambda_0 are solved again against it,
    so W = U diag(lambda_0) V^T holds for the loaded basis."""
    _trained("frod-saved").save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.frod_V.self_query"
    tensors[key] = tensors[key] * 2.0  # still a basis, but not the one this base regenerates
    save_file(tensors, path)
    loaded = up.AdaptedModel.from_pretrained(build("bert"), tmp_path)
    bank = loaded.banks["default"]
    torch.testing.assert_close(bank.V__self_query, tensors[key], rtol=0, atol=0)
    base = dict(build("bert").named_modules())
    checked = 0
    for delta in loaded.deltas("default"):
        v = bank.tensors(delta.category)[0]
        weight = base[delta.path].weight
        torch.testing.assert_close(delta.U @ torch.diag(delta.lambda_0) @ v.T, weight, **TOL)
        checked += delta.category == "self_query"
    assert checked == 2


@pytest.mark.parametrize("make,match", [
    (lambda: up.PveraConfig(r=0), r"PveraConfig\.r: expected a positive integer, got 0"),
    (lambda: up.FrodConfig(sparse_rate=1.5), r"FrodConfig\.sparse_rate: expected .*0 <= sparse_rate <= 1, got 1\.5"),
    (lambda: up.UniLoraConfig(theta_d_length=0), r"UniLoraConfig\.theta_d_length: expected a positive integer"),
    (lambda: up.UniLoraConfig(bias="all"), r"UniLoraConfig\.bias: expected one of \['none'\], got 'all'"),
    (lambda: up.TinyLoraConfig(weight_tying=1.2), r"TinyLoraConfig\.weight_tying: expected .*, got 1\.2"),
    (lambda: up.TinyLoraConfig(init_weights="gaussian"), r"TinyLoraConfig\.init_weights: expected one of"),
    (lambda: up.AdapterConfig.from_dict({"peft_type": "FROD", "runtime_offload_base_weight": True}),
     r"FrodConfig \(FROD\): field 'runtime_offload_base_weight'=True is not supported"),
])
def test_bad_fields_are_specific_errors(make, match):
    with pytest.raises(up.ConfigError, match=match):
        make()
