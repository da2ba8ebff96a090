"""PEFT parity of Poly / MHR in PEFT's POLY layout (up.PeftPolyConfig) and of X-LoRA (up.XLoraConfig).

Poly: a PEFT-trained POLY folder loads in unipeft with identical outputs for the same task ids; our
folder loads in PEFT with no missing or unexpected keys and identical outputs; the same seed gives the
same init as PEFT, and in training mode the same relaxed-Bernoulli draws.

X-LoRA: over two LoRA experts (one folder saved by PEFT, one by unipeft), a PEFT-trained classifier
loads in unipeft with identical outputs and expert weights, and ours loads in PEFT with identical
outputs (PEFT's own save drops classifier tensors: see the test).
"""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import unipeft as up
from unipeft import compat
from unipeft.methods.xlora import XLoraConfig, latest_scalings

from ._models import VOCAB, build, inputs
from ._parity import TOL, peft_load_report, train_steps

POLY_CASES = {
    # No task type: PEFT's task_ids go through PolyModel.forward (pm.base_model).
    "bert-mhr": ("bert", dict(r=4, n_tasks=3, n_skills=2, n_splits=2,
                              target_modules=["query", "value", "intermediate.dense"])),
    "bert-poly-init-b": ("bert", dict(r=2, n_tasks=2, n_skills=3, init_weights=False,
                                      target_modules=["key", "output.dense"])),
    # CAUSAL_LM: PeftModelForCausalLM hands task_ids on itself.
    "llama-causal": ("llama", dict(r=3, n_tasks=2, n_skills=3, target_modules=["q_proj", "down_proj"],
                                   task_type="CAUSAL_LM")),
}


def _ids(case: str, seed: int) -> torch.Tensor:
    n_tasks = POLY_CASES[case][1]["n_tasks"]
    return torch.randint(0, n_tasks, (4,), generator=torch.Generator().manual_seed(seed))


def _peft_out(pm, kind: str, batch: dict, ids: torch.Tensor) -> torch.Tensor:
    runner = pm if pm.peft_config["default"].task_type else pm.base_model
    return runner(**batch, task_ids=ids).logits


def _our_out(model, batch: dict, ids: torch.Tensor) -> torch.Tensor:
    return model(**batch, task_ids=ids).logits


def _step_data(case: str, seed: int):
    kind = POLY_CASES[case][0]
    return inputs(kind, seed=seed), _ids(case, seed)


@pytest.mark.parametrize("case", sorted(POLY_CASES))
def test_peft_trained_poly_folder_loads_with_identical_outputs(case, tmp_path):
    kind, fields = POLY_CASES[case]
    torch.manual_seed(0)
    pm = peft.get_peft_model(build(kind), peft.PolyConfig(**fields))
    train_steps(pm, lambda m, s: _peft_out(m, kind, *_step_data(case, s)), seed=10)
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    assert isinstance(ours.peft_config["default"], up.PeftPolyConfig)
    batch, ids = inputs(kind, seed=99), _ids(case, 99)
    with torch.no_grad():
        expected = _peft_out(pm, kind, batch, ids)
        assert (expected - build(kind)(**batch).logits).abs().max() > 1e-4, "the adapter does nothing"
        torch.testing.assert_close(_our_out(ours, batch, ids), expected, **TOL)
        # Routing matters: other task ids give other outputs, in both libraries alike.
        other = (ids + 1) % fields["n_tasks"]
        assert (_our_out(ours, batch, other) - expected).abs().max() > 1e-5
        torch.testing.assert_close(_our_out(ours, batch, other), _peft_out(pm, kind, batch, other), **TOL)


@pytest.mark.parametrize("case", sorted(POLY_CASES))
def test_our_poly_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, fields = POLY_CASES[case]
    config = up.AdapterConfig.from_dict(peft.PolyConfig(**fields).to_dict())  # PEFT's own dict -> ours
    assert isinstance(config, up.PeftPolyConfig)
    torch.manual_seed(1)
    ours = up.adapt(build(kind), config)
    train_steps(ours, lambda m, s: _our_out(m, *_step_data(case, s)), seed=20)
    ours.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(build(kind), peft.PolyConfig(**fields)).save_pretrained(tmp_path / "peft")
    _, _, _, missing_own = peft_load_report(build(kind), tmp_path / "peft")  # base weights: not adapter keys
    pm, noisy, unexpected, missing = peft_load_report(build(kind), tmp_path / "ours")
    assert not noisy and not unexpected, (noisy, unexpected)
    assert missing == missing_own and not any("poly_" in k for k in missing)
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == \
        set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert type(pm.peft_config["default"]).__name__ == "PolyConfig"
    batch, ids = inputs(kind, seed=98), _ids(case, 98)
    with torch.no_grad():
        torch.testing.assert_close(_peft_out(pm, kind, batch, ids), _our_out(ours, batch, ids), **TOL)


def test_poly_init_and_training_mode_sampling_equal_peft_for_the_same_seed():
    fields = dict(r=4, n_tasks=3, n_skills=2, n_splits=2, target_modules=["query", "value"])
    torch.manual_seed(5)
    pm = peft.get_peft_model(build("bert"), peft.PolyConfig(**fields))
    torch.manual_seed(5)
    ours = up.adapt(build("bert"), up.PeftPolyConfig(**fields))
    theirs = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "poly_" in k}
    mine = ours.adapter_state_dict()
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    with torch.no_grad():  # make B and the router matter, identically on both sides
        for key, value in mine.items():
            g = torch.Generator().manual_seed(len(key))
            noise = torch.randn(value.shape, generator=g)
            value.add_(noise)
            theirs[key].add_(noise)
    batch, ids = inputs("bert", seed=3), torch.tensor([0, 2, 1, 2])
    pm.train()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(11)
        expected = pm.base_model(**batch, task_ids=ids).logits
        torch.manual_seed(11)
        got = ours(**batch, task_ids=ids).logits
        torch.manual_seed(12)
        again = ours(**batch, task_ids=ids).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert (again - got).abs().max() > 1e-6, "training mode should sample the routing"


def test_poly_names_identity_and_errors():
    assert compat.PolyConfig(r=2, n_tasks=2).__class__ is up.PeftPolyConfig
    assert up.PolyConfig is not up.PeftPolyConfig and up.PolyConfig.peft_type == "POLY_ROUTING"
    assert up.AdapterConfig.from_dict({"peft_type": "POLY", "r": 2}).__class__ is up.PeftPolyConfig
    base = build("bert")
    batch = inputs("bert", seed=4)
    with torch.no_grad():
        ref = base(**batch).logits
    model = up.adapt(base, up.PeftPolyConfig(r=2, n_tasks=2, target_modules=["query"]))
    with torch.no_grad():
        torch.testing.assert_close(_our_out(model, batch, torch.tensor([0, 1, 1, 0])), ref, rtol=0, atol=0)
        with pytest.raises(up.ConfigError, match="task_ids"):
            model(**batch)
        with pytest.raises(up.ConfigError, match=r"task_ids.*\[0, 2\)"):
            model(**batch, task_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(up.ConfigError, match="PeftPolyConfig.n_splits=3.*divisible"):
        up.adapt(build("bert"), up.PeftPolyConfig(n_splits=3, target_modules=["query"]))
    with pytest.raises(up.ConfigError, match="PeftPolyConfig.poly_type"):
        up.PeftPolyConfig(poly_type="mhr")
    with pytest.raises(up.MergeError):
        model.merge()


# ---- X-LoRA ---------------------------------------------------------------------------------
# PEFT's X-LoRA loads its experts as LoRA adapters named "0", "1", ... and activates the keys of
# `adapters`, so those keys must be "0", "1", ... for PEFT to apply the experts at all.
XLORA_CASES = {
    "depth2": dict(xlora_depth=2, xlora_size=8),
    "layerwise-top1-softmax-topk": dict(layerwise_scalings=True, top_k_lora=1, enable_softmax_topk=True,
                                        enable_softmax=False),
    "depth3-pass-value-weight": dict(xlora_depth=3, xlora_size=6, xlora_dropout_p=0.0, scaling_pass_value=0.5,
                                     global_scaling_weight=0.7, softmax_temperature=0.5),
}


def llama():
    """A tiny seeded Llama with use_cache=False (PEFT's X-LoRA requires it)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                        use_cache=False)).eval()


def make_experts(root) -> dict[str, str]:
    """Two LoRA expert folders: "0" saved by PEFT (q_proj, v_proj; r=2), "1" saved by unipeft (v_proj,
    down_proj; r=3); B drawn at random so both do something."""
    def noise_b(named):
        with torch.no_grad():
            for n, p in named:
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    torch.manual_seed(10)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    noise_b(pm.named_parameters())
    pm.save_pretrained(root / "e0")
    torch.manual_seed(11)
    ours = up.adapt(llama(), up.LoraConfig(r=3, alpha=6, target_modules=["v_proj", "down_proj"]))
    noise_b([(f"{s.path}.{k}", p) for s in ours.sites() for k, p in s.deltas["default"].named_parameters()])
    ours.save_pretrained(root / "e1")
    return {"0": str(root / "e0"), "1": str(root / "e1")}


def _lm(model, seed: int) -> torch.Tensor:
    return model(**inputs("llama", seed=seed)).logits


def _classifier_state(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.state_dict().items() if "internal_xlora_classifier" in k}


@pytest.mark.parametrize("case", sorted(XLORA_CASES))
def test_peft_trained_xlora_folder_loads_with_identical_outputs(case, tmp_path):
    adapters = make_experts(tmp_path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters,
                                                       **XLORA_CASES[case]))
    before = _classifier_state(pm)
    train_steps(pm, _lm, seed=10)
    trained = _classifier_state(pm)
    assert all((trained[k] - before[k]).abs().max() > 0 for k in trained), "the classifier did not train"
    folder = tmp_path / "peft"
    pm.save_pretrained(folder)
    # PEFT's own file drops classifier tensors whose key contains ".0." (its filter for the LoRA experts'
    # adapter names): we refuse it, naming what is missing, rather than run a random classifier layer.
    with pytest.raises(up.AdapterLoadError, match=r"layers\.0\.weight' is missing"):
        up.AdaptedModel.from_pretrained(llama(), folder)
    save_file(trained, str(folder / "adapter_model.safetensors"))  # the complete classifier, PEFT's key names
    ours = up.AdaptedModel.from_pretrained(llama(), folder)
    assert isinstance(ours.peft_config["default"], XLoraConfig)
    with torch.no_grad():
        expected = _lm(pm, 99)
        assert (expected - _lm(llama(), 99)).abs().max() > 1e-3, "the experts do nothing"
        torch.testing.assert_close(_lm(ours, 99), expected, **TOL)
    scalings = latest_scalings(ours)
    assert scalings.shape == (4, 9, 6, 2)  # (batch, tokens, X-LoRA layers, experts)
    torch.testing.assert_close(scalings, pm.get_latest_scalings(), **TOL)


@pytest.mark.parametrize("case", sorted(XLORA_CASES))
def test_our_xlora_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    adapters = make_experts(tmp_path)
    torch.manual_seed(1)
    ours = up.adapt(llama(), XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, **XLORA_CASES[case]))
    assert ours.peft_config["default"].hidden_size == 32  # read from the model
    train_steps(ours.eval(), _lm, seed=20)
    ours.save_pretrained(tmp_path / "ours")
    file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours", adapters=adapters).eval()
    noisy = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected"))]
    result = set_peft_model_state_dict(pm, file)
    assert not noisy and not result.unexpected_keys, (noisy, result.unexpected_keys)
    assert set(file) == set(_classifier_state(pm))
    assert not [k for k in result.missing_keys if "internal_xlora_classifier" in k]
    with torch.no_grad():
        torch.testing.assert_close(_lm(pm, 98), _lm(ours, 98), **TOL)


def test_poly_generation_with_task_ids_matches_peft(tmp_path):
    fields = POLY_CASES["llama-causal"][1]
    torch.manual_seed(2)
    pm = peft.get_peft_model(build("llama"), peft.PolyConfig(**fields))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "poly_" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    pm.eval().save_pretrained(tmp_path)  # (PEFT's new routers start in training mode: they would sample)
    ours = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    ids, tasks = inputs("llama", seed=6)["input_ids"][:, :5], torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, task_ids=tasks, max_new_tokens=4, do_sample=False)
        got = ours.generate(input_ids=ids, task_ids=tasks, max_new_tokens=4, do_sample=False)
        other = ours.generate(input_ids=ids, task_ids=1 - tasks, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert not torch.equal(other, got), "the task ids should steer generation"
