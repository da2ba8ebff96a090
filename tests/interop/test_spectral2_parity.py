"""PEFT parity of HiRA, SuperTuning and WaveFT: PEFT-trained folders load in unipeft with identical outputs and
merges; our folders load in PEFT with no missing or unexpected keys and identical outputs; configs round-trip
through PEFT's JSON; the masks PEFT draws (SuperTuning's magnitude support, WaveFT's seeded locations) equal ours."""
from __future__ import annotations

import peft
import pytest
import torch

from ._parity import (assert_config_round_trips, assert_our_folder_loads_in_peft, assert_outputs_match,
                      assert_same_merge, fresh_pair, peft_trained)

QV = ["query", "value", "intermediate.dense"]  # 32x32, 32x32 and 32 -> 40 in the tiny BERT

CASES = {
    "hira": ("bert", lambda: peft.HiraConfig(r=4, target_modules=QV)),
    "hira-gaussian": ("bert", lambda: peft.HiraConfig(r=2, init_weights="gaussian", target_modules=QV)),
    "hira-embedding": ("bert", lambda: peft.HiraConfig(r=3, target_modules=["word_embeddings", "query"])),
    "hira-gpt2-conv1d": ("gpt2", lambda: peft.HiraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    "hira-conv": ("conv", lambda: peft.HiraConfig(r=2, target_modules=["conv1", "conv2", "head"])),
    "hira-llama-random": ("llama", lambda: peft.HiraConfig(r=2, init_weights=False, hira_dropout=0.1,
                                                           target_modules=["q_proj", "down_proj"])),
    "supertuning": ("bert", lambda: peft.SupertuningConfig(sparsity=0.9, target_modules=QV)),
    "supertuning-supra-bottom": ("bert", lambda: peft.SupertuningConfig(sparsity=0.95, select_top=False, r=4,
                                                                        target_modules=QV)),
    "supertuning-supra-random-alpha": ("llama", lambda: peft.SupertuningConfig(
        sparsity=0.8, r=2, lora_alpha=3.0, lora_dropout=0.1, init_weights=False, target_modules=["q_proj", "up_proj"])),
    "supertuning-no-indices": ("llama", lambda: peft.SupertuningConfig(
        sparsity=0.9, r=2, save_precomputed_indices=False, target_modules=["k_proj", "down_proj"])),
    "waveft": ("bert", lambda: peft.WaveFTConfig(n_frequency=64, scaling=10.0, target_modules=QV)),
    "waveft-db3-pattern-random": ("bert", lambda: peft.WaveFTConfig(
        n_frequency=40, scaling=20.0, wavelet_family="db3", random_loc_seed=5, init_weights=False,
        n_frequency_pattern={"value": 100}, target_modules=QV)),
    "waveft-no-idwt": ("bert", lambda: peft.WaveFTConfig(n_frequency=50, scaling=5.0, use_idwt=False,
                                                         target_modules=QV)),
    "waveft-gpt2-conv1d": ("gpt2", lambda: peft.WaveFTConfig(n_frequency=60, scaling=10.0, wavelet_family="db2",
                                                             target_modules=["c_attn", "c_fc"])),
    "waveft-proportional-db4": ("llama", lambda: peft.WaveFTConfig(
        n_frequency=70, scaling=10.0, wavelet_family="db4", proportional_parameters=True,
        target_modules=["q_proj", "k_proj", "down_proj"])),
    "waveft-db10-llama": ("llama", lambda: peft.WaveFTConfig(n_frequency=90, scaling=10.0, wavelet_family="db10",
                                                             target_modules=["q_proj", "up_proj"])),
}
ROUND_TRIP = ["hira-gaussian", "hira-llama-random", "supertuning", "supertuning-supra-random-alpha",
              "supertuning-no-indices", "waveft-db3-pattern-random", "waveft-proportional-db4"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = peft_trained(kind, make, tmp_path)
    assert_outputs_match(pm, ours.eval(), kind, 99)
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert_our_folder_loads_in_peft(kind, make, tmp_path, shapes=True)


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_config_round_trips_through_peft_json(case, tmp_path):
    """Our adapter_config.json loads as PEFT's config class with the same values, and back."""
    assert_config_round_trips(CASES[case][1], tmp_path)


def _peft_per_adapter(pm, attr: str) -> dict[str, torch.Tensor]:
    """{module path: the PEFT layer's `attr` of adapter "default"} over PEFT's tuner layers."""
    prefix, out = "base_model.model.", {}
    for name, module in pm.named_modules():
        held = getattr(module, attr, None)
        if held is not None and not isinstance(held, torch.Tensor) and "default" in held:
            out[name[len(prefix):]] = held["default"]
    return out


@pytest.mark.parametrize("case,attr,ours_attr", [
    ("supertuning", "supertuning_indices", "supertuning_indices"),
    ("supertuning-supra-bottom", "supertuning_indices", "supertuning_indices"),
    ("supertuning-no-indices", "supertuning_indices", "supertuning_indices"),
    ("waveft-db3-pattern-random", "waveft_indices", "indices"), ("waveft-gpt2-conv1d", "waveft_indices", "indices"),
    ("waveft-proportional-db4", "waveft_indices", "indices")])
def test_masks_equal_peft_selection(case, attr, ours_attr):
    """The supports (masks, locations) PEFT selects on the same base: equal, in the same order and dtype."""
    pm, ours = fresh_pair(*CASES[case])
    theirs = _peft_per_adapter(pm, attr)
    mine = {s.path: getattr(s.deltas["default"], ours_attr) for s in ours.sites()}
    assert theirs.keys() == mine.keys() and mine
    for path, value in mine.items():
        assert value.dtype == theirs[path].dtype and torch.equal(value, theirs[path]), path
