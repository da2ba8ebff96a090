"""PEFT parity of the shared-basis methods (VeRA with and without its stored projection, VB-LoRA with
full logits and top-k weights, RandLoRA dense / sparse, stored or regenerated): PEFT-trained folders
load in unipeft with identical outputs and merges; our folders load in PEFT with no missing or
unexpected keys and identical outputs."""
from __future__ import annotations

import peft
import pytest

from ._parity import (assert_our_folder_loads_in_peft, assert_peft_folder_loads_alike, assert_regenerated_bases_equal,
                      assert_same_merge)

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


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = assert_peft_folder_loads_alike(kind, make, tmp_path)
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert_our_folder_loads_in_peft(kind, make, tmp_path, moved=None)


@pytest.mark.parametrize("case", ["vera-regenerated", "randlora-regenerated"])
def test_regenerated_bases_equal_peft_generation(case):
    """With save_projection=False both sides regenerate the bases from the seed: bit-identical."""
    kind, make = CASES[case]
    names = ("vera_A", "vera_B") if case.startswith("vera") else ("randlora_A", "randlora_B")
    assert_regenerated_bases_equal(kind, make, names)
