"""PEFT parity of the newer shared-basis methods: PVeRA (stored / regenerated bases, sampling with a seeded
generator), FRoD (per-role bases from the weights, sparse patterns from the seed), UniLoRA (one shared
vector, seeded balanced indices, stored or not) and TinyLoRA (SVD factors, seeded projections, tied
vectors, an embedding), on BERT, GPT-2 Conv1D and Llama: PEFT-trained folders load in unipeft with
identical outputs and merges; our folders load in PEFT with no missing or unexpected keys and identical
outputs; what both sides regenerate is equal."""
from __future__ import annotations

import peft
import pytest
import torch

from ._models import build, inputs, output
from ._parity import (TOL, assert_our_folder_loads_in_peft, assert_peft_folder_loads_alike,
                      assert_regenerated_bases_equal, assert_same_merge, fresh_pair, peft_layers, peft_trained)

QV = ["query", "value", "intermediate.dense"]

CASES = {
    "pvera-saved": ("bert", lambda: peft.PveraConfig(r=8, target_modules=QV, save_projection=True)),
    "pvera-regenerated": ("bert", lambda: peft.PveraConfig(r=8, target_modules=QV, save_projection=False,
                                                           projection_prng_key=5, d_initial=0.2)),
    "pvera-gpt2-conv1d": ("gpt2", lambda: peft.PveraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    "frod-saved": ("bert", lambda: peft.FrodConfig(target_modules=QV + ["output.dense"], sparse_rate=0.05,
                                                   progressbar=False)),
    "frod-regenerated": ("bert", lambda: peft.FrodConfig(target_modules=QV, sparse_rate=0.1, save_projection=False,
                                                         projection_prng_key=3, progressbar=False)),
    "frod-gpt2-conv1d": ("gpt2", lambda: peft.FrodConfig(target_modules=["c_attn", "c_proj"], sparse_rate=0.05,
                                                         progressbar=False)),
    "unilora": ("bert", lambda: peft.UniLoraConfig(r=4, theta_d_length=64, target_modules=QV)),
    "unilora-save-indices": ("bert", lambda: peft.UniLoraConfig(r=4, theta_d_length=100, proj_seed=3,
                                                                target_modules=QV, save_indices=True)),
    "unilora-gpt2-conv1d": ("gpt2", lambda: peft.UniLoraConfig(r=2, theta_d_length=48, target_modules=["c_attn", "c_fc"])),
    "tinylora-saved": ("bert", lambda: peft.TinyLoraConfig(r=2, u=4, weight_tying=0.5,
                                                           target_modules=QV + ["word_embeddings"])),
    "tinylora-regenerated": ("bert", lambda: peft.TinyLoraConfig(r=3, u=6, projection_seed=5, save_projection=False,
                                                                 target_modules=QV)),
    "tinylora-gpt2-conv1d": ("gpt2", lambda: peft.TinyLoraConfig(r=2, u=5, weight_tying=1.0,
                                                                 target_modules=["c_attn", "c_fc"])),
    "tinylora-llama": ("llama", lambda: peft.TinyLoraConfig(r=4, u=3, weight_tying=0.3,
                                                            target_modules=["q_proj", "v_proj", "down_proj"])),
    "frod-llama": ("llama", lambda: peft.FrodConfig(target_modules=["q_proj", "down_proj"], sparse_rate=0.05,
                                                    progressbar=False)),
}
# The bases both sides regenerate from the seed, by case: (bank attribute, PEFT's BufferDict on base_model).
BASES = {"pvera-regenerated": ("pvera_A", "pvera_B")}
# FRoD's bank, per category: (our buffer prefix, PEFT's ModuleDict of BufferDicts on base_model).
FROD_BANK = (("V", "frod_V"), ("s_indices", "frod_s_indices"), ("s_size", "frod_s_size"))
# Cases whose forward samples noise even in eval mode (each site's generator seeded alike on both sides).
SAMPLING = {
    "pvera-sampling": ("bert", lambda: peft.PveraConfig(r=8, target_modules=QV, sample_at_inference=True,
                                                        generator_seed=3, save_projection=False)),
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


@pytest.mark.parametrize("case", sorted(BASES))
def test_regenerated_bases_equal_peft_generation(case):
    """With save_projection=False both sides regenerate the bases from the seed: bit-identical."""
    kind, make = CASES[case]
    assert_regenerated_bases_equal(kind, make, BASES[case])


@pytest.mark.parametrize("case", ["unilora", "unilora-gpt2-conv1d"])
def test_unilora_indices_and_scales_equal_peft_assignment(case):
    """Both sides assign every factor entry of every site to theta_d by the same seeded balanced draw."""
    pm, ours = fresh_pair(*CASES[case])
    layers = peft_layers(pm, peft.tuners.unilora.UniLoraLayer)
    assert len(layers) == len(ours.deltas("default")) >= 4
    for delta in ours.deltas("default"):
        for name in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"):
            assert torch.equal(getattr(delta, name), getattr(layers[delta.path], name)["default"]), name


@pytest.mark.parametrize("case", ["tinylora-regenerated", "tinylora-llama", "tinylora-saved"])
def test_tinylora_projections_and_groups_equal_peft(case):
    """Both sides draw each site's P from projection_seed + its target index and tie the same sites to one v."""
    pm, ours = fresh_pair(*CASES[case])
    layers = peft_layers(pm, peft.tuners.tinylora.TinyLoraLayer)
    assert len(layers) == len(ours.deltas("default")) >= 4
    for delta in ours.deltas("default"):
        layer = layers[delta.path]
        assert torch.equal(delta.tinylora_P, layer.tinylora_P["default"]), delta.path
        assert delta.group == layer._tinylora_v_key["default"], delta.path
    assert set(ours.banks["default"].tinylora_v) == set(pm.base_model.tinylora_v["default"])


@pytest.mark.parametrize("case", ["frod-regenerated", "frod-llama"])
def test_frod_bases_and_patterns_equal_peft_generation(case):
    """Both sides build each category's basis from the base weights and draw its sparse pattern from the
    seed: the same categories, bit-identical patterns, bases equal to float32 round-off."""
    pm, adapted = fresh_pair(*CASES[case])
    bank = adapted.banks["default"]
    categories = set(pm.base_model.frod_V)
    assert len(categories) >= 2
    for ours, theirs in FROD_BANK:
        assert {k.split("__", 1)[1] for k in dict(bank.named_buffers()) if k.startswith(ours + "__")} == categories
        for category in categories:
            mine, peft_value = getattr(bank, f"{ours}__{category}"), getattr(pm.base_model, theirs)[category]["default"]
            if ours == "V":
                torch.testing.assert_close(mine, peft_value, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(mine, peft_value), (ours, category)


@pytest.mark.parametrize("case", sorted(SAMPLING))
def test_sampled_outputs_equal_peft_with_the_same_generator_seed(case, tmp_path):
    """Both sides draw each site's noise from a CPU generator at generator_seed: the same samples, call
    after call; the merge uses the mean on both sides."""
    kind, make = SAMPLING[case]
    _, ours = peft_trained(kind, make, tmp_path)
    fresh = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()  # generators restart at the seed
    batch = inputs(kind, seed=99)
    with torch.no_grad():
        first, second = output(fresh, batch), output(fresh, batch)
        assert (first - second).abs().max() > 1e-6, "no sampling happened"
        torch.testing.assert_close(output(ours, batch), first, **TOL)
        torch.testing.assert_close(output(ours, batch), second, **TOL)
    assert_same_merge(fresh, ours)
