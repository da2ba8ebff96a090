"""PEFT parity of the spectral package (FourierFT, C3A, SHiRA, MiSS and its variants): PEFT-trained folders
load in unipeft with identical outputs and merges; our folders load in PEFT with no missing or unexpected
keys and identical outputs; FourierFT's regenerated locations and SHiRA's masks equal PEFT's."""
from __future__ import annotations

import peft
import pytest
import torch

from ._parity import (assert_config_round_trips, assert_our_folder_loads_in_peft, assert_peft_folder_loads_alike,
                      assert_same_merge, fresh_pair)

QV = ["query", "value", "intermediate.dense"]  # 32x32, 32x32 and 32 -> 40 in the tiny BERT

CASES = {
    "fourierft": ("bert", lambda: peft.FourierFTConfig(n_frequency=64, scaling=10.0, target_modules=QV)),
    "fourierft-pattern-zero": ("bert", lambda: peft.FourierFTConfig(
        n_frequency=32, scaling=20.0, random_loc_seed=3, init_weights=True, n_frequency_pattern={"value": 100},
        target_modules=QV)),
    "fourierft-gpt2-conv1d": ("gpt2", lambda: peft.FourierFTConfig(n_frequency=50, scaling=10.0,
                                                                   target_modules=["c_attn", "c_fc"])),
    "c3a": ("bert", lambda: peft.C3AConfig(block_size=8, target_modules=QV)),
    "c3a-pattern-gaussian": ("bert", lambda: peft.C3AConfig(block_size=8, block_size_pattern={"query": 16},
                                                            init_weights="gaussian", target_modules=QV)),
    "c3a-llama": ("llama", lambda: peft.C3AConfig(block_size=16, init_weights="kaiming_uniform",
                                                  target_modules=["q_proj", "k_proj", "down_proj"])),
    "shira": ("bert", lambda: peft.ShiraConfig(r=2, random_seed=7, target_modules=QV)),
    "shira-llama-default-seed": ("llama", lambda: peft.ShiraConfig(r=1, target_modules=["q_proj", "up_proj"])),
    "miss": ("bert", lambda: peft.MissConfig(r=4, target_modules=QV)),
    "miss-padded": ("bert", lambda: peft.MissConfig(r=3, target_modules=QV)),
    "miss-mini": ("bert", lambda: peft.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=QV)),
    "miss-bat": ("bert", lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=QV)),
    "miss-bat-llama": ("llama", lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj",
                                                                                                  "gate_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = assert_peft_folder_loads_alike(kind, make, tmp_path)
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert_our_folder_loads_in_peft(kind, make, tmp_path, shapes=True)


def _peft_layers(pm, attr: str) -> dict[str, dict]:
    """{module path: the PEFT layer's per-adapter dict `attr`} over PEFT's tuner layers."""
    prefix = "base_model.model."
    return {n[len(prefix):]: getattr(m, attr) for n, m in pm.named_modules() if hasattr(m, attr)
            and isinstance(getattr(m, attr), dict) and "default" in getattr(m, attr)}


@pytest.mark.parametrize("case,attr,ours_attr", [
    ("fourierft", "indices", "indices"), ("fourierft-pattern-zero", "indices", "indices"),
    ("fourierft-gpt2-conv1d", "indices", "indices"), ("shira", "shira_indices", "shira_indices"),
    ("shira-llama-default-seed", "shira_indices", "shira_indices")])
def test_seeded_locations_equal_peft_generation(case, attr, ours_attr):
    """FourierFT's spectral locations and SHiRA's random masks, drawn by both from the same seed: equal."""
    pm, ours = fresh_pair(*CASES[case])
    theirs = _peft_layers(pm, attr)
    mine = {s.path: getattr(s.deltas["default"], ours_attr) for s in ours.sites()}
    assert theirs.keys() == mine.keys() and mine
    for path, value in mine.items():
        assert torch.equal(value.long(), theirs[path]["default"].long()), path


@pytest.mark.parametrize("case", ["fourierft", "c3a", "shira", "miss", "miss-bat"])
def test_config_round_trips_through_peft_json(case, tmp_path):
    """Our adapter_config.json loads as PEFT's config class with the same values, and back."""
    assert_config_round_trips(CASES[case][1], tmp_path)
