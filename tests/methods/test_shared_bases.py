"""Shared-basis methods (VeRA, VB-LoRA, NOLA, RandLoRA, MoS, S2-LoRA): init, merge, persistence, file
size against LoRA, seed mismatches, what trains, and one bank shared by every site."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft as up
from unipeft.core.state import adapter_state_dict
from tests.interop._models import build, inputs, output

from ._helpers import (assert_merge_unmerge_and_reload, assert_seed_mismatch_refused, assert_untouched, state_of,
                       trained_bert)

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]  # 32x32, 32->40, 40->32 in the tiny BERT
R = 8

CONFIGS = {
    "vera": lambda: up.VeraConfig(r=R, target_modules=TARGETS, save_projection=False),
    "vera-saved": lambda: up.VeraConfig(r=R, target_modules=TARGETS, save_projection=True),
    "vblora": lambda: up.VBLoRAConfig(r=R, num_vectors=16, vector_length=8, target_modules=TARGETS),
    "vblora-topk": lambda: up.VBLoRAConfig(r=R, num_vectors=16, vector_length=8, target_modules=TARGETS,
                                           save_only_topk_weights=True),
    "nola": lambda: up.NolaConfig(r=R, alpha=16, num_basis_A=16, num_basis_B=16, target_modules=TARGETS),
    "randlora": lambda: up.RandLoraConfig(r=R, randlora_alpha=16, target_modules=TARGETS, save_projection=False),
    "randlora-saved": lambda: up.RandLoraConfig(r=R, randlora_alpha=16, target_modules=TARGETS),
    "mos": lambda: up.MosConfig(r=R, alpha=16, shards_per_vector=2, pool_size=24, private_shards=2,
                                target_modules=TARGETS),
    "s2lora": lambda: up.S2LoraConfig(r=R, active_ranks=4, alpha=16, target_modules=TARGETS),
}
# Exactly these per-site / bank parameters train (names as in the delta / bank state_dict).
TRAINED = {
    "vera": ({"vera_lambda_b", "vera_lambda_d"}, set()),
    "vblora": ({"vblora_logits_A", "vblora_logits_B"}, {"vblora_vector_bank"}),
    "nola": ({"nola_alpha", "nola_beta"}, set()),
    "randlora": ({"randlora_lambda", "randlora_gamma"}, set()),
    "mos": ({"mos_private_A", "mos_private_B"}, {"pool_A", "pool_B"}),
    "s2lora": ({"s2_coeff"}, {"s2_A", "s2_B"}),
}
FROZEN_BASES = {"vera": ("vera_A", "vera_B"), "nola": ("basis_A", "basis_B"), "randlora": ("randlora_A", "randlora_B")}


def _trained(name: str) -> up.AdaptedModel:
    return trained_bert(CONFIGS[name])


def _method(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_output(name):
    """The identity where the method initialises so; VB-LoRA's random mixture changes the output."""
    batch = inputs("bert", seed=3)
    base = build("bert")
    with torch.no_grad():
        expected = output(base, batch)
        got = output(up.adapt(base, CONFIGS[name]()), batch)
    if _method(name) == "vblora":
        assert not up.get_method("vblora").delta_cls.identity_at_init
        assert (got - expected).abs().max() > 1e-7  # small: the bank starts in +-0.02
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_equals_unmerged_and_save_load_exact(name, tmp_path):
    # VB-LoRA's top-k file rebuilds the logits from top-k softmax weights: the same mixture, to round-off.
    assert_merge_unmerge_and_reload(_trained(name), tmp_path, moved=1e-4,
                                    load_tol=1e-6 if name == "vblora-topk" else 0.0)


def _size(model, folder) -> int:
    model.save_pretrained(folder)
    return os.path.getsize(folder / "adapter_model.safetensors")


def test_regenerated_bases_give_smaller_files_than_lora(tmp_path):
    lora = _size(up.adapt(build("bert"), up.LoraConfig(r=R, target_modules=TARGETS)), tmp_path / "lora")
    sizes = {name: _size(up.adapt(build("bert"), CONFIGS[name]()), tmp_path / name) for name in CONFIGS}
    print("adapter_model.safetensors bytes:", {"lora": lora, **sizes})
    # LoRA: r * (in + out) floats per site; 2 layers x (query 64 + value 64 + intermediate 72 + 2 outputs 72).
    assert 4 * R * 2 * (64 + 64 + 72 + 72 + 72) <= lora < 4 * R * 2 * 344 + 4096
    # VeRA without its projection: lambda_b (out) + lambda_d (r) per site.
    vera_floats = 2 * ((32 + R) * 2 + (40 + R) + (32 + R) * 2)
    assert 4 * vera_floats <= sizes["vera"] < 4 * vera_floats + 4096
    # NOLA: 16 + 16 coefficients per site, plus the bases' fingerprint (two int64 CRCs).
    assert 4 * 10 * 32 + 8 * 2 <= sizes["nola"] < 4 * 10 * 32 + 8 * 2 + 4096
    # RandLoRA without its bases: lambda (r, n) + gamma (n, min) with n = ceil(min / r) = 4.
    rand_floats = 10 * (R * 4 + 4 * 32)
    assert 4 * rand_floats <= sizes["randlora"] < 4 * rand_floats + 4096
    for name in ("vera", "nola"):
        assert sizes[name] * 4 < lora, (name, sizes[name], lora)
    assert sizes["randlora"] * 2 < lora  # a full-rank update from r=8 bases, still under half of LoRA r=8
    # Storing the bases costs their size: larger than without.
    assert sizes["vera-saved"] - sizes["vera"] >= 4 * R * (40 + 40)
    assert sizes["randlora-saved"] > sizes["randlora"]
    for name in ("vblora-topk", "mos", "s2lora"):  # trained shared banks: smaller all the same
        assert sizes[name] < lora, (name, sizes[name], lora)
    # VB-LoRA's full logits (r x in/L x num_vectors per site) outweigh LoRA; its top-k file does not.
    assert sizes["vblora-topk"] * 4 < sizes["vblora"]


@pytest.mark.parametrize("name,field", [("vera-saved", "projection_prng_key"), ("nola", "basis_seed"),
                                        ("randlora-saved", "projection_prng_key")])
def test_seed_mismatch_is_one_error_naming_the_field_and_changes_nothing(name, field, tmp_path):
    _trained(name).save_pretrained(tmp_path)
    assert_seed_mismatch_refused(tmp_path, type(CONFIGS[name]()).__name__, field)


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_only_the_trained_vectors_change(method):
    name = method
    torch.manual_seed(0)
    model = up.adapt(build("bert"), CONFIGS[name]())
    site_names, bank_names = TRAINED[method]
    bank = model.banks["default"]
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == site_names | bank_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in bank.named_buffers()}
    trained = _trained(name)
    after = dict(trained.named_parameters())
    for n, old in before.items():
        changed = not torch.equal(after[n].detach(), old)
        assert changed == (n.rsplit(".", 1)[-1] in site_names | bank_names), n
    for n, b in trained.banks["default"].named_buffers():  # frozen bases stay as generated
        assert torch.equal(b, buffers[n]), n
    assert set(FROZEN_BASES.get(method, ())) <= set(buffers)


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_one_bank_tensor_shared_by_every_site(method):
    model = up.adapt(build("bert"), CONFIGS[method]())
    deltas = [s.deltas["default"] for s in model.sites()]
    assert len(deltas) == 10
    bank = model.banks["default"]
    assert all(d.bank is bank for d in deltas)
    for key, tensor in list(bank.named_parameters()) + list(bank.named_buffers()):
        if key == "basis_fingerprint":
            continue
        assert all(getattr(d.bank, key) is tensor for d in deltas)
        assert tensor.data_ptr() == getattr(deltas[0].bank, key).data_ptr()
    # The bank's state is saved once, at the file root.
    saved = adapter_state_dict(model, "default")
    assert len([k for k in saved if not k.startswith("base_model.model.")]) == len(bank.state_dict())


def test_mos_switches_and_field_errors():
    def indices(**kw):
        model = up.adapt(build("bert"), CONFIGS["mos"]().replace(**kw))
        return [(s.deltas["default"].mos_index_A, s.deltas["default"].mos_index_B) for s in model.sites()]
    default = indices()
    assert any(not torch.equal(a, b) for a, b in default)  # pair dissociation: independent routes
    assert len({tuple(a.tolist()) for a, _ in default}) > 1  # subset selection: each site its own subset
    assert all(len(set(a.tolist())) == len(a) for a, _ in default)  # no repeated shard within a site
    assert all(torch.equal(a, b) for a, b in indices(pair_dissociation=False))
    pure = indices(subset_selection=False)
    assert all(torch.equal(a, pure[0][0]) for a, _ in pure)
    assert pure[0][0].tolist() == list(range(2 * R - 2))
    model = up.adapt(build("bert"), CONFIGS["mos"]().replace(private_shards=0))
    assert next(iter(model.sites())).deltas["default"].mos_private_A.shape[0] == 0
    with pytest.raises(up.ConfigError, match=r"MosConfig\.pool_size.*14"):
        up.MosConfig(r=R, pool_size=4, private_shards=2, target_modules=TARGETS)
    with pytest.raises(up.ConfigError, match=r"MosConfig\.private_shards"):
        up.MosConfig(r=R, private_shards=17, target_modules=TARGETS)


def test_bad_fields_and_widths_are_specific_errors():
    with pytest.raises(up.ConfigError, match=r"S2LoraConfig\.active_ranks.*r=8"):
        up.S2LoraConfig(r=8, active_ranks=9)
    with pytest.raises(up.ConfigError, match=r"VBLoRAConfig\.topk"):
        up.VBLoRAConfig(num_vectors=4, topk=5)
    base = build("bert")
    with pytest.raises(up.TargetError, match=r"vector_length=16.*in_features \(40\)"):
        up.adapt(base, up.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules=["output.dense"]))
    assert not any(isinstance(m, up.Delta) for m in base.modules())


def test_vblora_topk_file_holds_indices_and_weights(tmp_path):
    _trained("vblora-topk").save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    site = "base_model.model.bert.encoder.layer.0.attention.self.query."
    assert keys[site + "vblora_logits_A_topk_indices"].dtype == torch.uint8
    assert keys[site + "vblora_logits_A_topk_weights"].shape == (R, 32 // 8, 1)
    assert not any(k.endswith("vblora_logits_A") for k in keys)
    assert keys["base_model.vblora_vector_bank"].shape == (16, 8)


def test_randlora_site_copy_of_the_bases_must_match(tmp_path):
    """PEFT's RandLoRA files repeat the bases under every site: a copy that differs is refused."""
    _trained("randlora-saved").save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.randlora_A"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(path))
    base = build("bert")
    state = state_of(base)
    with pytest.raises(up.AdapterLoadError, match=r"layer\.1\.attention\.self\.value.*randlora_A.*projection_prng_key"):
        up.AdaptedModel.from_pretrained(base, tmp_path)
    assert_untouched(base, state)
