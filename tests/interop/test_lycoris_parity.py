"""LoHa and LoKr against PEFT's LoHaConfig / LoKrConfig: PEFT-trained folders load in unipeft with identical
outputs, gradients and merged weights; our trained folders load in PEFT with no missing or unexpected keys
and identical outputs; the same seed draws PEFT's initial tensors; the dimension split equals PEFT's."""
from __future__ import annotations


import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file

import unipeft as up
from unipeft.methods.lycoris import factorization

from ._models import build, inputs, output
from ._parity import assert_outputs_match, assert_same_merge, ours_trained, output_loss, peft_load_report, train_on

BERT = ["query", "value", "intermediate.dense", "classifier"]
# Rank dropout renormalises by the kept share of output rows: PEFT gives NaN when every row of a narrow layer
# (the 3-way classifier) is dropped, so the dropout cases adapt the wide layers only.
WIDE = ["query", "value", "intermediate.dense"]
LLAMA = ["q_proj", "k_proj", "v_proj", "down_proj"]
CONV = ["conv1", "conv2", "head"]

CASES = {
    "bert-loha-patterns-dropouts": ("bert", lambda: peft.LoHaConfig(
        r=4, alpha=8, target_modules=WIDE, rank_pattern={"value": 2},
        alpha_pattern={"layer.0.attention.self.query": 3},
        rank_dropout=0.2, module_dropout=0.2)),
    "llama-loha-layers": ("llama", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=LLAMA,
                                                           layers_to_transform=[1])),
    "gpt2-loha-head": ("gpt2", lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["lm_head"])),
    "conv-loha-flat": ("conv", lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=CONV)),
    "conv-loha-effective": ("conv", lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=CONV,
                                                            use_effective_conv2d=True)),
    "bert-lokr-patterns": ("bert", lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=BERT, rank_pattern={"query": 1},
                                                           alpha_pattern={"value": 2})),
    "bert-lokr-decompose-both": ("bert", lambda: peft.LoKrConfig(
        r=1, alpha=2, target_modules=WIDE, decompose_both=True, decompose_factor=4, rank_dropout=0.2,
        rank_dropout_scale=True, module_dropout=0.1)),
    "llama-lokr-lycoris-init": ("llama", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=LLAMA,
                                                                 decompose_both=True, init_weights="lycoris")),
    "gpt2-lokr-head": ("gpt2", lambda: peft.LoKrConfig(r=2, target_modules=["lm_head"])),
    "conv-lokr-effective": ("conv", lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=CONV, decompose_both=True,
                                                            use_effective_conv2d=True)),
    "conv-lokr-whole": ("conv", lambda: peft.LoKrConfig(r=4, target_modules=CONV)),
    "conv-lokr-flat": ("conv", lambda: peft.LoKrConfig(r=1, target_modules=CONV)),
}
ADAPTER_KEYS = ("hada_", "lokr_")


def _loss(model, kind: str, seed: int) -> torch.Tensor:
    return output_loss(output(model, inputs(kind, seed=seed)))


def _train(model, kind: str, seed: int):
    """A few AdamW steps in training mode (rank and module dropout active), so no factor stays at its init."""
    return train_on(model, kind, seed, train_mode=True)


def _peft_grads(pm) -> dict[str, torch.Tensor]:
    """{file key: grad} of a PEFT model's adapter parameters."""
    return {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}


def _our_grads(model) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{s.path}.{k}": p.grad
            for s in model.sites() for k, p in s.deltas["default"].named_parameters()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_grads_and_merge(case, tmp_path):
    kind, make = CASES[case]
    torch.manual_seed(0)
    pm = _train(peft.get_peft_model(build(kind), make()), kind, seed=10)
    # lm_head is one of PEFT's embedding names: by default it would also save the (unchanged) tied weights.
    pm.save_pretrained(tmp_path, save_embedding_layers=False)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path, is_trainable=True).eval()
    assert type(ours.peft_config["default"]).method == ("loha" if "loha" in case else "lokr")
    assert_outputs_match(pm, ours, kind, 99, moved=1e-4)

    for model in (pm, ours):
        model.zero_grad()
        _loss(model, kind, 99).backward()
    g_peft, g_ours = _peft_grads(pm), _our_grads(ours)
    assert g_peft.keys() == g_ours.keys() == set(load_file(str(tmp_path / "adapter_model.safetensors")))
    for key in g_peft:
        site = key.rsplit(".", 1)[0]
        if key.endswith(("hada_w1_a", "hada_w2_a")) and f"{site}.hada_t1" in g_peft:
            # PEFT's hand-written backward of LoHa's CP form contracts hada_w1_a's gradient with the other
            # factor's core (t2, w2_b) and vice versa; ours is autograd's, checked against finite differences
            # in tests/methods/test_lycoris.py. Outputs, merges and every other gradient agree.
            continue
        torch.testing.assert_close(g_ours[key], g_peft[key], atol=1e-5, rtol=1e-4, msg=f"gradient of {key}")

    if kind == "gpt2":  # lm_head shares its weight with wte: merging is refused by design
        with pytest.raises(up.MergeError, match="tied"):
            ours.merge()
        return
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_trained_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    ours = ours_trained(kind, make, tmp_path, train_mode=True)
    pm, noisy, unexpected, missing = peft_load_report(build(kind), tmp_path)
    assert not noisy, noisy
    assert not unexpected
    assert not [k for k in missing if any(s in k for s in ADAPTER_KEYS)]
    assert_outputs_match(ours, pm, kind, 98, moved=1e-4)


@pytest.mark.parametrize("case", ["conv-loha-effective", "conv-lokr-effective", "llama-lokr-lycoris-init",
                                  "bert-lokr-decompose-both"])
def test_same_seed_gives_peft_initial_tensors(case):
    kind, make = CASES[case]
    torch.manual_seed(7)
    pm = peft.get_peft_model(build(kind), make())
    torch.manual_seed(7)
    ours = up.adapt(build(kind), up.AdapterConfig.from_dict(make().to_dict()))
    theirs, mine = peft.get_peft_model_state_dict(pm), ours.adapter_state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def test_factorization_equals_peft():
    for factor in (-1, 1, 2, 3, 4, 5, 8, 16):
        for dim in range(1, 300):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("cls", [peft.LoHaConfig, peft.LoKrConfig])
def test_gpt2_conv1d_is_refused_by_both(cls):
    with pytest.raises((TypeError, ValueError), match="Conv1D"):
        peft.get_peft_model(build("gpt2"), cls(target_modules=["c_attn"]))
    config = up.AdapterConfig.from_dict(cls(target_modules=["c_attn"]).to_dict())
    with pytest.raises(up.TargetError, match="is a Conv1D"):
        up.adapt(build("gpt2"), config)
