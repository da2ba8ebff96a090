"""PEFT parity of the structured low-rank methods (GraLoRA with and without its hybrid LoRA, DeFT with both
projections, alpha and PaRa, Lily with shared A / B, PEANuT with and without hidden layers): PEFT-trained
folders load in unipeft with identical outputs (and merges, where the method merges); our folders load in
PEFT with no missing or unexpected keys and identical outputs."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict

import unipeft as up
from unipeft import compat
from unipeft.core.state import adapter_state_dict

from ._models import build
from ._parity import assert_our_folder_loads_in_peft, assert_peft_folder_loads_alike, assert_same_merge

QV = ["query", "value", "intermediate.dense"]

CASES = {
    "gralora": ("bert", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, target_modules=QV)),
    "gralora-hybrid-k4": ("bert", lambda: peft.GraloraConfig(r=8, hybrid_r=2, alpha=6, gralora_k=4,
                                                             target_modules=QV)),
    "gralora-gpt2-conv1d": ("gpt2", lambda: peft.GraloraConfig(r=4, alpha=8, gralora_k=2, hybrid_r=1,
                                                               target_modules=["c_attn", "c_fc"])),
    "deft": ("bert", lambda: peft.DeftConfig(r=4, target_modules=QV)),
    "deft-qr-alpha": ("bert", lambda: peft.DeftConfig(r=4, alpha=8, decomposition_method="qr", target_modules=QV)),
    "deft-para-gpt2": ("gpt2", lambda: peft.DeftConfig(r=3, para=True, target_modules=["c_attn", "c_proj"])),
    "deft-llama": ("llama", lambda: peft.DeftConfig(r=4, alpha=4, target_modules=["q_proj", "down_proj"])),
    "lily": ("bert", lambda: peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=QV)),
    "lily-stride1-scaled": ("bert", lambda: peft.LilyConfig(r=3, stride_A=1, num_B=2, scaling=0.5,
                                                            target_modules=["query", "key", "output.dense"])),
    "lily-llama": ("llama", lambda: peft.LilyConfig(r=4, stride_A=2, num_B=2,
                                                    target_modules=["q_proj", "v_proj", "down_proj"])),
    "peanut": ("bert", lambda: peft.PeanutConfig(r=4, target_modules=QV)),
    "peanut-depth2-gelu": ("bert", lambda: peft.PeanutConfig(r=4, depth=2, act_fn="gelu", scaling=0.5,
                                                             target_modules=QV)),
    "peanut-llama": ("llama", lambda: peft.PeanutConfig(r=3, depth=1, target_modules=["k_proj", "down_proj"])),
}
MERGEABLE = {"gralora", "deft", "peanut"}


def _method(case: str) -> str:
    return case.split("-")[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trips_through_peft_dict_and_compat_factory(case):
    _, make = CASES[case]
    theirs = make().to_dict()
    ours = up.AdapterConfig.from_dict(theirs)
    assert type(ours).peft_class == type(make()).__name__
    written = ours.to_dict()
    for key, value in written.items():  # every key we write is PEFT's, with PEFT's value
        expected = theirs[key]
        expected = sorted(expected) if isinstance(expected, set) else expected
        assert value == expected, key
    assert set(theirs) - set(written) <= {"peft_version", "revision", "auto_mapping"}
    fields = {k: v for k, v in theirs.items() if k not in ("peft_type", "peft_version", "revision", "auto_mapping")}
    assert getattr(compat, type(ours).peft_class)(**fields).to_dict() == written


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = assert_peft_folder_loads_alike(kind, make, tmp_path)
    if _method(case) in MERGEABLE:
        assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert_our_folder_loads_in_peft(kind, make, tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_adapter_draws_peft_initial_tensors(case):
    """Same seed, same targets: our initial tensors are PEFT's (init order and distributions carried over)."""
    kind, make = CASES[case]
    torch.manual_seed(5)
    theirs = get_peft_model_state_dict(peft.get_peft_model(build(kind), make()))
    torch.manual_seed(5)
    ours = adapter_state_dict(up.adapt(build(kind), up.AdapterConfig.from_dict(make().to_dict())), "default")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
