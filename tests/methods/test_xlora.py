"""X-LoRA mechanics: the scaling pass sees the base model, only the classifier trains, save/load is exact,
generation matches PEFT's, and bad experts or fields are refused with the field named."""
from __future__ import annotations

import json

import peft
import pytest
import torch

import unipeft as up
from unipeft.methods.xlora import XLoraConfig, latest_scalings

from ..interop._models import inputs
from ..interop.test_poly_xlora_parity import llama, make_experts


@pytest.fixture()
def experts(tmp_path):
    return make_experts(tmp_path)


def _model(experts, **fields):
    return up.adapt(llama(), XLoraConfig(adapters=experts, xlora_depth=2, xlora_size=8, **fields)).eval()


def test_first_pass_is_the_base_model_and_weights_are_per_token(experts):
    model = _model(experts)
    batch = inputs("llama", seed=3)
    with torch.no_grad():
        out = model(**batch).logits
        base = llama()
        hidden = base(**batch, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(latest_scalings(model), model.banks["default"](hidden), rtol=0, atol=0)
        assert (out - base(**batch).logits).abs().max() > 1e-3
        with model.disable_adapters():
            torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    w = latest_scalings(model)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))  # softmax over the experts
    assert (w[:, 0] - w[:, 1]).abs().max() > 1e-4  # tokens get their own weights
    assert model.banks["default"].current is None  # nothing of the call is held after it


def test_only_the_classifier_trains_and_round_trip_is_exact(experts, tmp_path):
    model = _model(experts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("banks.default.layers.") for n in trainable)
    model.set_adapter("default")  # re-activating must not unfreeze the experts
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for seed in range(3):
        opt.zero_grad()
        model(**inputs("llama", seed=seed)).logits.pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.save_pretrained(tmp_path / "x")
    saved = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "XLORA" and saved["adapters"] == experts and "target_modules" not in saved
    again = up.AdaptedModel.from_pretrained(llama(), tmp_path / "x").eval()
    batch = inputs("llama", seed=7)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_not_mergeable_no_mixed_batch(experts):
    model = _model(experts)
    batch = inputs("llama", seed=3)
    with pytest.raises(up.MergeError):
        model.merge()
    with pytest.raises(up.ConfigError, match="mixed"):
        model(**batch, adapter_names=["default"] * 4)


def test_generation_matches_peft(experts):
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts,
                                                       xlora_depth=2, xlora_size=8))
    ours = _model(experts)
    state = {k.split("internal_xlora_classifier.")[1]: v for k, v in pm.state_dict().items()
             if "internal_xlora_classifier" in k}
    ours.banks["default"].load_state_dict(state)
    ids = inputs("llama", seed=5)["input_ids"][:2, :5]
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        got = ours.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    with pytest.raises(up.ConfigError, match="use_cache=False"):
        ours.generate(input_ids=ids, max_new_tokens=2, do_sample=False, use_cache=True)


def test_bad_experts_and_fields_are_refused(experts, tmp_path):
    with pytest.raises(up.ConfigError, match=r"XLoraConfig.adapters: expected a non-empty"):
        XLoraConfig(adapters={})
    with pytest.raises(up.ConfigError, match=r"XLoraConfig.adapters\['2'\]: expected a LoRA adapter folder"):
        XLoraConfig(adapters={**experts, "2": str(tmp_path / "nowhere")})
    with pytest.raises(up.ConfigError, match="use_trainable_adapters"):
        XLoraConfig(adapters=experts, use_trainable_adapters=True)
    with pytest.raises(up.ConfigError, match="enable_softmax_topk=True needs top_k_lora"):
        XLoraConfig(adapters=experts, enable_softmax_topk=True)
    with pytest.raises(up.ConfigError, match="XLoraConfig.top_k_lora"):
        XLoraConfig(adapters=experts, top_k_lora=0)
    up.adapt(llama(), up.IA3Config(target_modules=["v_proj"])).save_pretrained(tmp_path / "ia3")
    with pytest.raises(up.ConfigError, match="must be LoRA adapters"):
        XLoraConfig(adapters={"0": str(tmp_path / "ia3")})
    up.adapt(llama(), up.LoraConfig(r=2, use_dora=True, target_modules=["v_proj"])).save_pretrained(tmp_path / "dora")
    with pytest.raises(up.ConfigError, match="plain LoRA"):
        up.adapt(llama(), XLoraConfig(adapters={"0": str(tmp_path / "dora")}))
    wrapper = torch.nn.Module()  # no transformers config: the width must be given
    wrapper.inner = llama()
    with pytest.raises(up.ConfigError, match="no config.hidden_size"):
        up.adapt(wrapper, XLoraConfig(adapters=experts))


def test_one_expert_at_weight_one_is_that_lora_on_gpt2_conv1d(tmp_path):
    """With a single expert the softmax gives it weight 1 on every token: X-LoRA equals the LoRA alone
    (GPT-2's transposed Conv1D layers; PEFT's X-LoRA cannot load experts of this model, so no PEFT here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                          bos_token_id=0, eos_token_id=0, use_cache=False)).eval()
    torch.manual_seed(3)
    lora = up.adapt(gpt2(), up.LoraConfig(r=3, alpha=6, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for site in lora.sites():
            site.deltas["default"].lora_B.weight.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "e")
    model = up.adapt(gpt2(), XLoraConfig(adapters={"only": str(tmp_path / "e")}, global_scaling_weight=1.0)).eval()
    batch = inputs("gpt2", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, lora.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
        assert (model(**batch).logits - gpt2()(**batch).logits).abs().max() > 1e-3
    assert latest_scalings(model).shape == (4, 9, 4, 1)
