"""PEFT parity of the shared-basis methods (VeRA with and without its stored projection, VB-LoRA with
full logits and top-k weights, RandLoRA dense / sparse, stored or regenerated): PEFT-trained folders
load in unipeft with identical outputs and merges; our folders load in PEFT with no missing or
unexpected keys and identical outputs."""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import unipeft as up

from ._models import build, inputs, output
from ._parity import TOL, assert_same_merge, peft_load_report, train_steps

QV = ["query", "value", "intermediate.dense"]

CASES = {
    "vera-saved": ("bert", lambda: peft.VeraConfig(r=8, target_modules=QV, save_projection=True)),
    "vera-regenerated": ("bert", lambda: peft.VeraConfig(r=8, target_modules=QV, save_projection=False,
                                                         projection_prng_key=5, d_initial=0.2)),
    "vera-gpt2-conv1d": ("gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    "vblora": ("bert", lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=2, target_modules=QV)),
    "vblora-topk": ("bert", lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=3,
                                                      target_modules=QV, save_only_topk_weights=True)),
    "vblora-llama": ("llama", lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=8,
                                                        target_modules=["q_proj", "down_proj"])),
    "randlora-saved": ("bert", lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=QV)),
    "randlora-regenerated": ("bert", lambda: peft.RandLoraConfig(r=6, randlora_alpha=12, target_modules=QV,
                                                                 save_projection=False, projection_prng_key=3)),
    "randlora-sparse-gpt2": ("gpt2", lambda: peft.RandLoraConfig(r=6, randlora_alpha=12, sparse=True,
                                                                 target_modules=["c_attn", "c_proj"])),
    "randlora-very-sparse": ("bert", lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, very_sparse=True,
                                                                 target_modules=["query", "output.dense"])),
}


def _train(model, kind: str, seed: int):
    return train_steps(model, lambda m, s: output(m, inputs(kind, seed=s)), seed)


def _peft_load_report(kind: str, folder):
    return peft_load_report(build(kind), folder)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    torch.manual_seed(0)
    pm = _train(peft.get_peft_model(build(kind), make()), kind, seed=10)
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    batch = inputs(kind, seed=99)
    with torch.no_grad():
        expected = output(pm, batch)
        assert (expected - output(build(kind), batch)).abs().max() > 1e-5, "the adapter does nothing"
        torch.testing.assert_close(output(ours, batch), expected, **TOL)
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    config = up.AdapterConfig.from_dict(make().to_dict())  # PEFT's own dict -> our config
    torch.manual_seed(1)
    ours = _train(up.adapt(build(kind), config), kind, seed=20)
    ours.save_pretrained(tmp_path / "ours")
    # What PEFT itself leaves out of its own file (shared buffers it keeps once) is the reference.
    peft.get_peft_model(build(kind), make()).save_pretrained(tmp_path / "peft")
    _, _, _, missing_own = _peft_load_report(kind, tmp_path / "peft")

    pm, noisy, unexpected, missing = _peft_load_report(kind, tmp_path / "ours")
    assert not noisy, noisy
    assert not unexpected
    assert missing == missing_own
    ours_keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    peft_keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert ours_keys == peft_keys
    batch = inputs(kind, seed=98)
    with torch.no_grad():
        torch.testing.assert_close(output(pm, batch), output(ours, batch), **TOL)


@pytest.mark.parametrize("case", ["vera-regenerated", "randlora-regenerated"])
def test_regenerated_bases_equal_peft_generation(case):
    """With save_projection=False both sides regenerate the bases from the seed: bit-identical."""
    kind, make = CASES[case]
    pm = peft.get_peft_model(build(kind), make())
    ours = up.adapt(build(kind), up.AdapterConfig.from_dict(make().to_dict()))
    bank = ours.banks["default"]
    names = ("vera_A", "vera_B") if case.startswith("vera") else ("randlora_A", "randlora_B")
    for name in names:
        theirs = getattr(pm.base_model, name)["default"]
        assert torch.equal(getattr(bank, name), theirs.float()), name
