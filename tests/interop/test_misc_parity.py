"""PEFT parity of GLoRA (every form of its weight, bias-coupling and bias paths, with and without a base
bias), BEFT (explicit and default targets; layers without a bias refuse the merge in both), AdaMSS (its
clustering and ASA's masking equal PEFT's) and ShadowPEFT (default and chosen blocks, a narrower backbone, the
auxiliary loss, cached generation): PEFT-trained folders load in unipeft with identical outputs and merges; our folders
load in PEFT with no missing or unexpected keys and identical outputs; configs round-trip through PEFT's
JSON as PEFT's config class."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.adamss.layer import AdamssLayer

import unipeft as up
from unipeft.core.hooks import TrainContext

from ._models import build, inputs, output
from ._parity import (TOL, assert_config_round_trips, assert_our_folder_loads_in_peft, assert_outputs_match,
                      assert_same_merge, fresh_pair, output_loss, peft_layers, peft_trained)

QV = ["query", "value", "intermediate.dense"]  # 32x32, 32x32 and 32 -> 40 in the tiny BERT (with biases)
LLAMA = ["q_proj", "k_proj", "down_proj"]      # no biases in the tiny Llama

CASES = {
    "glora": ("bert", lambda: peft.GloraConfig(r=4, target_modules=QV)),
    "glora-vector-vector": ("bert", lambda: peft.GloraConfig(r=4, config_A_B="vector", config_C="vector",
                                                             config_D_E="vector", target_modules=QV)),
    "glora-constant-none": ("bert", lambda: peft.GloraConfig(config_A_B="constant", config_C="none",
                                                             config_D_E="none", target_modules=QV)),
    "glora-none-lora-random": ("bert", lambda: peft.GloraConfig(r=2, config_A_B="none", config_C="lora",
                                                                config_D_E="vector", init_weights=False,
                                                                target_modules=QV)),
    "glora-llama-no-bias": ("llama", lambda: peft.GloraConfig(r=4, target_modules=LLAMA)),
    "beft": ("bert", lambda: peft.BeftConfig(target_modules=QV)),
    "beft-default-targets-random": ("bert", lambda: peft.BeftConfig(init_weights=False)),
    "beft-llama-no-bias": ("llama", lambda: peft.BeftConfig(target_modules=LLAMA)),
    "adamss": ("bert", lambda: peft.AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules=QV)),
    "adamss-dynamic-rank-seed": ("bert", lambda: peft.AdamssConfig(
        r=12, num_subspaces=4, subspace_rank=3, use_dynamic_rank=True, svd_threshold=0.3, random_seed=5,
        target_modules=QV)),
    "adamss-llama-no-bias-random": ("llama", lambda: peft.AdamssConfig(r=6, num_subspaces=2, subspace_rank=2,
                                                                       init_weights=None, target_modules=LLAMA)),
    "adamss-asa-config": ("bert", lambda: peft.AdamssConfig(r=8, num_subspaces=3, use_asa=True, init_warmup=1,
                                                            final_warmup=10, mask_interval=2,
                                                            asa_target_subspaces=4, target_modules=QV)),
    "shadow-llama": ("llama", lambda: peft.ShadowConfig(r=4, task_type="CAUSAL_LM")),
    "shadow-llama-one-block-deeper": ("llama", lambda: peft.ShadowConfig(
        r=2, target_modules=["model.layers.1"], shadow_num_hidden_layers=2, shadow_alpha=0.5, init_weights=False)),
    "shadow-gpt2-narrow-backbone": ("gpt2", lambda: peft.ShadowConfig(
        r=4, shadow_hidden_size=16, shadow_num_attention_heads=2, shadow_intermediate_size=24, update_hidden_size=6,
        task_type="CAUSAL_LM")),
}
# Layers without a bias cannot take BEFT's vector into their weights: PEFT and unipeft both refuse the merge.
# ShadowPEFT's adaptation depends on the input: neither merges it.
NOT_MERGEABLE = {"beft-llama-no-bias": (ValueError, "no bias"), "shadow-llama": (NotImplementedError, "merged"),
                 "shadow-llama-one-block-deeper": (NotImplementedError, "merged"),
                 "shadow-gpt2-narrow-backbone": (NotImplementedError, "merged")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    pm, ours = peft_trained(kind, make, tmp_path)
    expected = assert_outputs_match(pm, ours, kind, 99)
    if case in NOT_MERGEABLE:
        error, words = NOT_MERGEABLE[case]
        with pytest.raises(error, match=words):
            pm.merge_and_unload()
        with pytest.raises(up.MergeError, match="no bias" if "beft" in case else "shadow, which cannot be merged"):
            ours.merge()
        assert ours.merged_adapters == []
        with torch.no_grad():
            torch.testing.assert_close(output(ours, inputs(kind, seed=99)), expected, **TOL)
        return
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert_our_folder_loads_in_peft(kind, make, tmp_path, shapes=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trips_through_peft_json(case, tmp_path):
    """Our adapter_config.json loads as PEFT's config class with the same values, and back."""
    assert_config_round_trips(CASES[case][1], tmp_path)


def test_glora_fresh_adapter_is_identity_and_random_init_is_not():
    """init_weights=True leaves the model unchanged (as PEFT's); init_weights=False changes it."""
    batch = inputs("bert", seed=5)
    with torch.no_grad():
        base = output(build("bert"), batch)
        same = output(up.adapt(build("bert"), up.GloraConfig(r=4, target_modules=QV)), batch)
        moved = output(up.adapt(build("bert"), up.GloraConfig(r=4, init_weights=False, target_modules=QV)), batch)
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert (moved - base).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["adamss", "adamss-dynamic-rank-seed", "adamss-llama-no-bias-random"])
def test_adamss_subspaces_equal_peft_clustering(case):
    """The seeded SVD, the K-means clustering of output rows and the per-subspace ranks are PEFT's."""
    pm, adapted = fresh_pair(*CASES[case])
    theirs = peft_layers(pm, AdamssLayer)
    ours = {s.path: s.deltas["default"] for s in adapted.sites()}
    assert theirs.keys() == ours.keys() and ours
    for path, layer in theirs.items():
        delta = ours[path]
        assert torch.equal(delta.scatter_index, layer.scatter_index["default"]), path
        torch.testing.assert_close(delta.adamss_newB, layer.adamss_newB["default"], rtol=0, atol=0)
        assert [b.shape for b in delta.adamss_B] == [b.shape for b in layer.adamss_B["default"]], path
        assert [a.shape for a in delta.adamss_A] == [a.shape for a in layer.adamss_A["default"]], path
    if case == "adamss":
        assert any(len({b.shape[0] for b in d.adamss_B}) > 1 for d in ours.values()), "clusters of one size only"


def test_adamss_asa_freezes_the_subspaces_peft_freezes(tmp_path):
    """Same adapter, same gradients: ASA's importance EMAs and global top-k masking freeze, step by step, the
    subspaces PEFT's update_and_allocate freezes (no optimizer step, so both see identical parameters)."""
    make = lambda: peft.AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, init_weights=None, use_asa=True,  # noqa: E731
                                     init_warmup=0, final_warmup=6, mask_interval=2, asa_target_subspaces=4,
                                     target_modules=QV)
    torch.manual_seed(0)
    pm = peft.get_peft_model(build("bert"), make())
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("bert"), tmp_path, is_trainable=True)
    (callback,) = ours.peft_config["default"].training_callbacks(ours, "default")
    layers_ = peft_layers(pm, AdamssLayer)
    deltas = {s.path: s.deltas["default"] for s in ours.sites()}
    frozen_seen = 0
    for step in range(7):
        batch = inputs("bert", seed=50 + step)
        output_loss(output(pm, batch)).backward()
        pm.base_model.update_and_allocate(step)
        output_loss(output(ours, batch)).backward()
        callback.on_before_optimizer_step(TrainContext(model=ours, optimizer=None, step=step))
        for path, layer in layers_.items():
            theirs = [p.requires_grad for p in layer.adamss_A["default"]]
            mine = [p.requires_grad for p in deltas[path].adamss_A]
            assert mine == theirs, f"step {step}, {path}"
            assert mine == [p.requires_grad for p in deltas[path].adamss_B]
            frozen_seen = max(frozen_seen, mine.count(False))
        pm.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
    assert frozen_seen > 0, "ASA froze nothing"


def _shadow_pair(case, tmp_path):
    """PEFT's model after a few steps and ours loaded from its folder."""
    kind, make = CASES[case]
    return (kind, *peft_trained(kind, make, tmp_path))


@pytest.mark.parametrize("case", ["shadow-llama", "shadow-gpt2-narrow-backbone"])
def test_shadow_auxiliary_loss_equals_peft(case, tmp_path):
    """With labels, the loss holds the task loss plus auxiliary_loss_weight * CE(lm_head(s0)), as in PEFT."""
    kind, pm, ours = _shadow_pair(case, tmp_path)
    batch = inputs(kind, seed=7)
    with torch.no_grad():
        theirs = pm(**batch, labels=batch["input_ids"])
        mine = ours(**batch, labels=batch["input_ids"])
        plain = build(kind)(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(mine.shadow_loss, theirs.shadow_loss, **TOL)
    torch.testing.assert_close(mine.loss, theirs.loss, **TOL)
    assert abs(float(mine.loss - plain.loss)) > 1e-4


@pytest.mark.parametrize("case", ["shadow-llama", "shadow-llama-one-block-deeper"])
def test_shadow_cached_generation_equals_peft(case, tmp_path):
    """Greedy generation with the KV cache (the backbone continues its own cache) gives PEFT's tokens, and the
    same tokens as generation without a cache."""
    kind, pm, ours = _shadow_pair(case, tmp_path)
    ids = inputs(kind, seed=3)["input_ids"][:2, :5]
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
        mine = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
        uncached = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **args)
    assert torch.equal(mine, theirs)
    assert torch.equal(uncached, theirs)
