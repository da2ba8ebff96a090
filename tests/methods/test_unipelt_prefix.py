"""UniPELT's gated prefix (`UniPELTConfig(prefix_length=...)`), checked against unipeft's plain prefix tuning and
against attention computed here by hand.

AdapterHub's formula: per layer l, g_l = mean over the sequence of sigmoid(W_l h_l + b_l) (h_l: the hidden states
entering layer l's attention), one value per example; the layer's prefix keys and values are multiplied by g_l.
The prefix positions stay attended, so a zero gate leaves zero keys (softmax weight exp(0) each) with zero values.
Init (AdapterHub's): gate weight N(0, 0.02), bias PyTorch's default uniform(+-1/sqrt(hidden)), so every gate starts
close to sigmoid(0) = 0.5: the prefix starts half-mixed in (the adapter is not the identity at init)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import unipeft as up

N = 3  # prefix length


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24,
                                                    attn_implementation="eager")).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=24)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()


MODELS = {"bert": (bert, "bert.embeddings.word_embeddings", "SEQ_CLS"),
          "llama": (llama, "model.embed_tokens", "CAUSAL_LM"),
          "gpt2": (gpt2, "transformer.wte", "CAUSAL_LM")}


def batch():
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def unipelt(make, flat=False, shared=True):
    cfg = up.UniPELTConfig(r=2, reduction_factor=4, prefix_length=N, prefix_bottleneck_size=8, prefix_flat=flat,
                           prefix_shared_gating=shared)
    return up.adapt(make(), cfg)


def plain_prefix(make, task, path, state):
    """unipeft's PrefixTuningConfig with the given prefix tensors (the encoder's state_dict)."""
    flat = "transform.0.weight" not in state
    cfg = up.PrefixTuningConfig(num_virtual_tokens=N, task_type=task, prefix_projection=not flat,
                                encoder_hidden_size=None if flat else 8)
    model = up.adapt(make(), cfg)
    model.delta_at("default", path).load_state_dict(state)
    return model


def set_gates(model, weight=0.0, bias=0.0):
    with torch.no_grad():
        for gate in model.banks["default"].gates:
            gate.weight.fill_(weight)
            gate.bias.fill_(bias)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_gate_init_and_structure():
    model = unipelt(bert)
    bank = model.banks["default"]
    assert bank.paths == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    w = torch.cat([g.weight.flatten() for g in bank.gates])
    assert all(g.weight.shape == (1, 16) for g in bank.gates) and 0.005 < w.std() < 0.05
    assert all(g.bias.abs().max() <= 1 / math.sqrt(16) for g in bank.gates)
    hidden = torch.randn(3, 7, 16)
    for layer in range(2):
        assert (bank.gate_values(layer, hidden) - 0.5).abs().max() < 0.15
    driver = model.delta_at("default", bank.driver)
    assert driver.model_input and not driver.identity_at_init
    assert sum(d.model_input for d in model.deltas("default")) == 1
    assert all(p.requires_grad for p in bank.parameters())
    assert unipelt(bert, shared=False).banks["default"].gates[0].weight.shape == (2, 16)
    plain = up.adapt(bert(), up.UniPELTConfig(r=2, reduction_factor=4))  # prefix off by default
    assert "default" not in plain.banks and not any(d.model_input for d in plain.deltas("default"))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_gate_one_equals_plain_prefix_tuning(name, flat):
    make, path, task = MODELS[name]
    model = unipelt(make, flat=flat)
    set_gates(model, bias=100.0)  # sigmoid(100) == 1.0 in float32
    ref = plain_prefix(make, task, path, model.banks["default"].prefix.state_dict())
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), rtol=0, atol=0)
    assert (logits(model, inputs) - logits(make(), inputs)).abs().max() > 1e-4  # the prefix does act


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_constant_gate_equals_scaled_prefix_also_in_generation(name):
    make, path, task = MODELS[name]
    model = unipelt(make, flat=True)
    b = 0.7
    set_gates(model, bias=b)
    s = torch.sigmoid(torch.tensor(b))
    state = {k: v * s for k, v in model.banks["default"].prefix.state_dict().items()}
    ref = plain_prefix(make, task, path, state)
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), rtol=1e-6, atol=1e-6)
    if name == "llama":  # each step rescales the unscaled prefix (never an earlier step's scaled one)
        kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
        got, want = model.generate(**inputs, **kw), ref.generate(**inputs, **kw)
        torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-5)


def test_gate_zero_keeps_prefix_positions_with_zero_keys_and_values():
    """Zero gate: the prefix keys are 0 (score 0, weight exp(0)) and the values 0, so the prefix positions still
    take softmax mass: equal to plain prefix tuning with an all-zero prefix, not to the model without one."""
    make, path, task = MODELS["bert"]
    model = unipelt(make, flat=True)
    set_gates(model, bias=-1000.0)  # sigmoid(-1000) == 0.0
    inputs = {"input_ids": batch()["input_ids"], "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    zero = plain_prefix(make, task, path, {k: torch.zeros_like(v) for k, v in
                                            model.banks["default"].prefix.state_dict().items()})
    torch.testing.assert_close(logits(model, inputs), logits(zero, inputs), rtol=0, atol=0)
    assert (logits(model, inputs) - logits(make(), inputs)).abs().max() > 1e-4
    # layer 0's self-attention by hand: softmax over [N zeros, q k^T / sqrt(d)] times [N zero rows, v]
    attn = model.base_model.bert.encoder.layer[0].attention.self
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.update(h=a[0], out=out[0]),
                                        with_kwargs=True)
    try:
        logits(model, inputs)
    finally:
        handle.remove()
    h, heads, d = seen["h"], 2, 8

    def split(t):
        return t.view(3, 7, heads, d).transpose(1, 2)
    q, k, v = (split(f(h)) for f in (attn.query, attn.key, attn.value))
    scores = torch.cat((torch.zeros(3, heads, 7, N), q @ k.transpose(-1, -2) / math.sqrt(d)), dim=-1)
    ctx = torch.softmax(scores, dim=-1) @ torch.cat((torch.zeros(3, heads, N, d), v), dim=-2)
    torch.testing.assert_close(seen["out"], ctx.transpose(1, 2).reshape(3, 7, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_gate_is_per_row_mean_of_sigmoid_of_the_layer_input(shared):
    model = unipelt(llama, shared=shared)
    bank = model.banks["default"]
    with torch.no_grad():
        for gate in bank.gates:
            gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    attn = model.base_model.model.layers[1].self_attn
    seen = {}

    def grab(module, args, kwargs, out):
        entry = kwargs["past_key_values"].layers[1]
        seen.update(h=kwargs["hidden_states"], k=entry.keys[..., :N, :].clone(), v=entry.values[..., :N, :].clone())
    handle = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        logits(model, batch())
    finally:
        handle.remove()
    with torch.no_grad():
        gate = bank.gates[1]
        g = torch.sigmoid(seen["h"] @ gate.weight.T + gate.bias).mean(dim=1)  # (batch, 1 or 2)
        k, v = bank.prefix.key_values(3, torch.float32)[1]
    assert g.shape == (3, 1 if shared else 2) and (g[:, 0] - g[0, 0]).abs().max() > 1e-4  # differs by row
    torch.testing.assert_close(seen["k"], k * g[:, 0].view(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["v"], v * g[:, -1].view(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flat", [False, True])
def test_gradients_reach_gates_and_prefix(flat):
    model = unipelt(llama, flat=flat)
    model.train()
    out = model(**batch(), labels=batch()["input_ids"])
    out.loss.backward()
    bank = model.banks["default"]
    for name, p in bank.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lora_b = [d.lora_B for d in model.deltas("default") if hasattr(d, "lora_B")]
    assert lora_b and all(b.grad is not None and b.grad.abs().sum() > 0 for b in lora_b)


@pytest.mark.parametrize("flat", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, flat):
    model = unipelt(bert, flat=flat)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    inputs = batch()
    want = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert any(k.startswith("bank.gates.") for k in model.adapter_state_dict())
    for trainable in (False, True):
        loaded = up.AdaptedModel.from_pretrained(bert(), tmp_path, is_trainable=trainable)
        assert loaded.peft_config["default"].prefix_length == N and loaded.peft_config["default"].prefix_flat == flat
        torch.testing.assert_close(logits(loaded, inputs), want, rtol=0, atol=0)


def test_hooks_last_one_call_even_when_it_raises():
    model = unipelt(bert)
    attns = [model.base_model.get_submodule(p) for p in model.banks["default"].paths]
    logits(model, batch())
    assert not any(a._forward_pre_hooks for a in attns)

    def boom(*_):
        raise RuntimeError("boom")
    handle = model.base_model.bert.encoder.layer[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            logits(model, batch())
    finally:
        handle.remove()
    assert not any(a._forward_pre_hooks for a in attns)
    assert not model.base_model._forward_hooks


def test_refusals():
    model = unipelt(bert)
    with pytest.raises(up.ConfigError, match="mixed batch"):
        model(**batch(), adapter_names=["default"] * 3)
    lm = unipelt(llama)
    lm.base_model.activation_checkpointing_enable()
    lm.train()
    with pytest.raises(up.ConfigError, match="gradient checkpointing"):
        lm(**batch())


@pytest.mark.parametrize("kwargs, match", [({"prefix_length": 0}, "prefix_length"),
                                           ({"prefix_bottleneck_size": 0}, "prefix_bottleneck_size"),
                                           ({"prefix_flat": "yes"}, "prefix_flat"),
                                           ({"prefix_shared_gating": 1}, "prefix_shared_gating")])
def test_bad_prefix_fields(kwargs, match):
    with pytest.raises(up.ConfigError, match=match):
        up.UniPELTConfig(**kwargs)
