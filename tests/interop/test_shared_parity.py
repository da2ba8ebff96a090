"""PEFT parity of the shared-basis methods (VeRA with and without its stored projection, VB-LoRA with
full logits and top-k weights, RandLoRA dense / sparse, stored or regenerated): PEFT-trained folders
load in unipeft with identical outputs and merges; our folders load in PEFT with no missing or
unexpected keys and identical outputs."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

import unipeft as up

from ._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)
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


def _loss(model, kind: str, seed: int) -> torch.Tensor:
    out = output(model, inputs(kind, seed=seed))
    return (out.float() ** 2).mean() + out.float().mean()


def _train(model, kind: str, seed: int, steps: int = 3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        _loss(model, kind, seed + step).backward()
        opt.step()
    return model.eval()


def _peft_load_report(kind: str, folder):
    """PEFT loads `folder`: (model, warnings about keys, unexpected keys, missing adapter keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(build(kind), folder).eval()
    noisy = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected"))]
    result = set_peft_model_state_dict(pm, load_file(str(folder / "adapter_model.safetensors")))
    return pm, noisy, set(result.unexpected_keys), set(result.missing_keys)


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
    merged_peft = pm.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    for key in merged_peft:
        torch.testing.assert_close(merged_ours[key], merged_peft[key], **TOL, msg=f"merged {key}")


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
