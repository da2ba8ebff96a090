"""PEFT parity of RoAd (its three variants, with and without a bias), PSOFT (exact and Neumann Cayley
maps, a free R, PiSSA-style factors, the seeded low-rank SVD) and OSF (default, integer, fractional and
pattern ranks, wide and tall layers): PEFT-trained folders load in unipeft with identical outputs and
merged weights; our folders load in PEFT with no missing or unexpected keys and identical outputs.
RoAd also matches PEFT's own mixed-batch forward (adapter_names) row for row."""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import unipeft as up

from ._models import build, inputs, output
from ._parity import TOL, assert_our_folder_loads_in_peft, assert_peft_folder_loads_alike, assert_same_merge, train_on

QV = ["query", "value", "intermediate.dense"]

CASES = {
    "road-1": ("bert", lambda: peft.RoadConfig(group_size=8, target_modules=QV)),
    "road-2": ("llama", lambda: peft.RoadConfig(variant="road_2", group_size=4,
                                                target_modules=["q_proj", "down_proj", "gate_proj"])),
    "road-4": ("bert", lambda: peft.RoadConfig(variant="road_4", group_size=8, target_modules=["key", "dense"])),
    "psoft": ("bert", lambda: peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=QV)),
    "psoft-neumann-eps-pissa": ("llama", lambda: peft.PsoftConfig(
        r=6, use_cayley_neumann=True, num_cayley_neumann_terms=4, cayley_neumann_eps=0.5, ab_svd_init="pissa_init",
        target_modules=["q_proj", "down_proj", "k_proj"])),
    "psoft-free-lowrank": ("bert", lambda: peft.PsoftConfig(
        r=3, psoft_orth=False, psoft_mag_a=False, psoft_svd="lowrank", psoft_svd_lowrank_niter=3, random_seed=7,
        target_modules=["key", "dense"])),
    "osf": ("bert", lambda: peft.OSFConfig(target_modules=QV + ["output.dense"])),
    "osf-ranks": ("llama", lambda: peft.OSFConfig(effective_rank=0.25, rank_pattern={r"layers\.1\.mlp\.down_proj": 5},
                                                  target_modules=["q_proj", "down_proj", "gate_proj", "k_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = assert_peft_folder_loads_alike(kind, make, tmp_path, moved=1e-4)
    assert_same_merge(pm, ours, base=build(kind))


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert up.AdapterConfig.from_dict(make().to_dict()).peft_type == make().peft_type
    assert_our_folder_loads_in_peft(kind, make, tmp_path, moved=1e-4)


def test_road_mixed_batch_matches_peft_adapter_names(tmp_path):
    """Two trained RoAd adapters and the base, one per row: PEFT's adapter_names forward = ours."""
    folders = {}
    for i, (name, variant) in enumerate((("a", "road_1"), ("b", "road_4"))):
        torch.manual_seed(i)
        cfg = peft.RoadConfig(variant=variant, group_size=8, target_modules=QV)
        pm = train_on(peft.get_peft_model(build("bert"), cfg), "bert", 30 + i)
        pm.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    pm = peft.PeftModel.from_pretrained(build("bert"), folders["a"], adapter_name="a").eval()
    pm.load_adapter(folders["b"], adapter_name="b")
    ours = up.AdaptedModel.from_pretrained(build("bert"), folders["a"], adapter_name="a")
    ours.load_adapter(folders["b"], adapter_name="b")
    names = ["a", "__base__", "b", "a"]
    batch = inputs("bert", seed=97)
    with torch.no_grad():
        expected = pm(**batch, adapter_names=names).logits
        got = ours(**batch, adapter_names=names).logits
        torch.testing.assert_close(got, expected, **TOL)
        assert (expected[0] - expected[2]).abs().max() > 1e-4 and (expected[1] - expected[0]).abs().max() > 1e-4


TRAINED_ALIKE = {
    "road-4": CASES["road-4"],
    "psoft-neumann-eps-pissa": CASES["psoft-neumann-eps-pissa"],
    # square (query), tall (intermediate.dense: projected against U_high) and wide (output.dense: V_high)
    "osf": CASES["osf"],
}


@pytest.mark.parametrize("case", sorted(TRAINED_ALIKE))
def test_same_init_and_steps_train_to_the_same_tensors(case, tmp_path):
    """Both sides start from the same (deterministic) init and take the same AdamW steps: the saved tensors
    agree, so the gradients agree (for OSF: its projections away from the frozen high subspace)."""
    kind, make = TRAINED_ALIKE[case]
    pm = train_on(peft.get_peft_model(build(kind), make()), kind, 40)
    ours = train_on(up.adapt(build(kind), up.AdapterConfig.from_dict(make().to_dict())), kind, 40)
    pm.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert theirs.keys() == mine.keys()
    fresh = up.adapt(build(kind), up.AdapterConfig.from_dict(make().to_dict()))
    init = {(s.path, n): p.detach() for s in fresh.sites() for n, p in s.deltas["default"].named_parameters()}
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], **TOL, msg=key)
    moved = sum(not torch.equal(p.detach(), init[(s.path, n)])
                for s in ours.sites() for n, p in s.deltas["default"].named_parameters())
    assert moved > 0, "training moved no tensor"


RANDOM_INITS = {
    "road": lambda: peft.RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=QV),
    "psoft": lambda: peft.PsoftConfig(r=4, init_weights=False, target_modules=QV),
    "psoft-free": lambda: peft.PsoftConfig(r=4, psoft_orth=False, init_weights=False, target_modules=QV),
    "osf": lambda: peft.OSFConfig(effective_rank=5, init_weights=False, target_modules=QV),
}


@pytest.mark.parametrize("case", sorted(RANDOM_INITS))
def test_random_init_equals_peft_init_for_one_seed(case, tmp_path):
    """init_weights=False: built right after the same seeded model, both sides draw the same tensors."""
    make = RANDOM_INITS[case]
    peft.get_peft_model(build("bert"), make()).save_pretrained(tmp_path / "peft")
    up.adapt(build("bert"), up.AdapterConfig.from_dict(make().to_dict())).save_pretrained(tmp_path / "ours")
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert theirs.keys() == mine.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    with torch.no_grad():
        batch = inputs("bert", seed=96)
        ours = up.AdaptedModel.from_pretrained(build("bert"), tmp_path / "ours")
        assert (output(ours, batch) - output(build("bert"), batch)).abs().max() > 1e-6  # not the identity
