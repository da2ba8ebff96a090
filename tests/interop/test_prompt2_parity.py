"""PEFT parity of multitask prompt tuning, adaption prompt (LLaMA-Adapter), CPT and Cartridge: a PEFT folder
(after a few AdamW steps) loads in unipeft with identical outputs; PEFT loads ours with no missing or
unexpected keys and identical outputs."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import unipeft as up

from ._models import build
from ._parity import TOL, perturb, train_steps

N = 4


def _batch(seed: int = 1, rows: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (rows, 7), generator=g)
    mask = torch.ones(rows, 7, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row: the extended mask must keep it masked
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch, **extra) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, **extra).logits
    return out[:, -batch["input_ids"].shape[1]:]  # PEFT's prompt methods also return the virtual positions


def _peft_loads(base, folder):
    """PEFT loads `folder` with no missing/unexpected-key (or unexpected-config-key) warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return peft.PeftModel.from_pretrained(base, folder).eval()


# ---- multitask prompt tuning ---------------------------------------------------------------
TASKS = torch.tensor([2, 0, 1])


def _mpt_peft():
    cfg = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=2)
    model = peft.get_peft_model(build("llama"), cfg)
    return train_steps(model, lambda m, s: m(**_batch(s), task_ids=TASKS).logits, seed=10)


def test_mpt_peft_folder_loads_with_identical_outputs(tmp_path):
    theirs = _mpt_peft()
    batch = _batch()
    expected = _logits(theirs, batch, task_ids=TASKS)
    theirs.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    got = _logits(ours, batch, task_ids=TASKS)
    torch.testing.assert_close(got, expected, **TOL)
    other = _logits(ours, batch, task_ids=torch.tensor([0, 1, 2]))
    assert (other - got).abs().max() > 1e-4, "the task factors do nothing"
    with ours.disable_adapters():
        torch.testing.assert_close(_logits(ours, batch), _logits(build("llama"), batch), rtol=0, atol=0)
    with pytest.raises(up.ConfigError, match="task_ids"):
        ours(**batch)  # three tasks: the call must say which


def test_mpt_peft_loads_our_folder_with_identical_outputs(tmp_path):
    ours = up.adapt(build("llama"), up.MultitaskPromptTuningConfig(num_virtual_tokens=N, num_tasks=3, num_ranks=2,
                                                                    task_type="CAUSAL_LM"))
    perturb(ours, seed=3, scale=0.3)
    batch = _batch()
    expected = _logits(ours, batch, task_ids=TASKS)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MULTITASK_PROMPT_TUNING" and saved["num_tasks"] == 3
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {
        "prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    theirs = _peft_loads(build("llama"), tmp_path)
    torch.testing.assert_close(_logits(theirs, batch, task_ids=TASKS), expected, **TOL)
    assert (expected - _logits(build("llama"), batch)).abs().max() > 1e-3, "the adapter does nothing"


def test_mpt_source_inits_read_a_saved_adapter(tmp_path):
    source = up.adapt(build("llama"), up.MultitaskPromptTuningConfig(num_virtual_tokens=N, num_tasks=3,
                                                                      num_ranks=2))
    perturb(source, seed=3, scale=0.3)
    source.save_pretrained(tmp_path)
    file = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(file)
    for init, cols in (("average_source_tasks", tensors["prefix_task_cols"].mean(0, keepdim=True)),
                       ("exact_source_task", tensors["prefix_task_cols"][1:2])):
        cfg = up.MultitaskPromptTuningConfig(num_virtual_tokens=N, num_ranks=2, init=init, init_task=1,
                                             init_state_dict_path=file)
        target = up.adapt(build("llama"), cfg)
        state = target.adapter_state_dict()
        torch.testing.assert_close(state["prefix_task_cols"], cols, rtol=0, atol=0)
        torch.testing.assert_close(state["prompt_embeddings"], tensors["prompt_embeddings"], rtol=0, atol=0)
    peft_cfg = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_ranks=2,
                                                prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=1,
                                                prompt_tuning_init_state_dict_path=file)
    theirs = peft.get_peft_model(build("llama"), peft_cfg)
    enc = theirs.prompt_encoder["default"]
    torch.testing.assert_close(enc.prefix_task_rows.detach(), tensors["prefix_task_rows"][1:2], rtol=0, atol=0)
    with pytest.raises(up.ConfigError, match="init_state_dict_path"):
        up.MultitaskPromptTuningConfig(init="exact_source_task")


# ---- adaption prompt (LLaMA-Adapter) ---------------------------------------------------------
def _llama(seed: int = 0, layers: int = 3):
    """A tiny random Llama with grouped-query attention (3 layers: the top 2 are adapted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _ap_base(kind: str):
    return _llama() if kind == "llama" else build("gpt2")


AP_KEYS = {"llama": "base_model.model.model.layers.{}.self_attn.adaption_{}",
           "gpt2": "base_model.model.transformer.h.{}.attn.adaption_{}"}
AP_LAYERS = {"llama": (1, 2), "gpt2": (0, 1)}  # the top two layers


def _ap_peft(kind: str = "llama"):
    cfg = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=N, adapter_layers=2)
    model = peft.get_peft_model(_ap_base(kind), cfg)
    return train_steps(model, lambda m, s: m(**_batch(s)).logits, seed=20, steps=4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adaption_prompt_peft_folder_loads_with_identical_outputs(kind, tmp_path):
    theirs = _ap_peft(kind)
    batch = _batch()
    expected = _logits(theirs, batch)
    theirs.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {AP_KEYS[kind].format(i, k) for i in AP_LAYERS[kind] for k in ("prompt", "gate")}
    ours = up.AdaptedModel.from_pretrained(_ap_base(kind), tmp_path)
    got = _logits(ours, batch)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - _logits(_ap_base(kind), batch)).abs().max() > 1e-3, "the loaded adapter does nothing"
    with ours.disable_adapters():
        torch.testing.assert_close(_logits(ours, batch), _logits(_ap_base(kind), batch), rtol=0, atol=0)
    torch.testing.assert_close(_logits(ours.unload(), batch), _logits(_ap_base(kind), batch), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adaption_prompt_peft_loads_our_folder_with_identical_outputs(kind, tmp_path):
    ours = up.adapt(_ap_base(kind), up.AdaptionPromptConfig(adapter_len=N, adapter_layers=2, task_type="CAUSAL_LM"))
    batch = _batch()
    torch.testing.assert_close(_logits(ours, batch), _logits(_ap_base(kind), batch), rtol=0, atol=0)  # zero gates
    train_steps(ours, lambda m, s: m(**_batch(s)).logits, seed=30, steps=4)
    assert all(g.detach().abs().item() > 0 for g in ours.deltas("default")[0].gates)
    expected = _logits(ours, batch)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT"
    assert saved["target_modules"] == {"llama": "self_attn", "gpt2": "attn"}[kind]
    theirs = _peft_loads(_ap_base(kind), tmp_path)
    torch.testing.assert_close(_logits(theirs, batch), expected, **TOL)
    assert (expected - _logits(_ap_base(kind), batch)).abs().max() > 1e-3, "the adapter does nothing"


def test_adaption_prompt_same_weights_same_gradients(tmp_path):
    """Given PEFT's trained tensors, our loss and the gradients of every prompt and gate equal PEFT's."""
    theirs = _ap_peft().train()
    theirs.zero_grad(set_to_none=True)  # the training steps left their last gradients
    theirs.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(_llama(), tmp_path, is_trainable=True).train()
    batch = _batch(5)
    (theirs(**batch).logits ** 2).mean().backward()
    (ours(**batch).logits ** 2).mean().backward()
    their_grads = {n.split(".adaption_")[0]: p.grad for n, p in theirs.named_parameters()
                   if "adaption_prompt" in n}
    delta = ours.deltas("default")[0]
    for path, prompt in zip(delta.layer_paths, delta.prompts):
        want = their_grads[f"base_model.model.{path}"]
        assert want.abs().max() > 0
        torch.testing.assert_close(prompt.grad, want, **TOL)


def test_adaption_prompt_generation_matches_peft(tmp_path):
    theirs = _ap_peft()
    theirs.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(_llama(), tmp_path)
    ids = _batch()["input_ids"][:1]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, **kw)
        got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)
    assert not ours.base_model._forward_hooks, "the per-call hooks were not removed"


# ---- CPT -------------------------------------------------------------------------------------
CPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12, 13]
CPT_TYPES = [1, 2, 2, 3, 4, 5, 6, 7, 8]  # two in-context examples: template, input, template, label
CPT_FIELDS = dict(cpt_token_ids=CPT_IDS, cpt_mask=[1] * len(CPT_IDS), cpt_tokens_type_mask=CPT_TYPES,
                  opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5, opt_projection_epsilon=2.0,
                  opt_projection_format_epsilon=1.0)


def _cpt_batch(seed: int):
    batch = _batch(seed)
    types = torch.tensor([1, 2, 2, 3, 4, 4, 4]).expand(3, -1).clone()
    types[1, :2] = 0  # padding: no type
    return batch, batch["input_ids"].clone(), types


def _cpt_step(model, opt, seed: int) -> torch.Tensor:
    batch, labels, types = _cpt_batch(seed)
    opt.zero_grad()
    out = model(**batch, labels=labels, input_type_mask=types.clone())  # (PEFT shifts the mask in place)
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def test_cpt_trains_like_peft_and_each_loads_the_others_folder(tmp_path):
    """Same start (the tokens' embeddings, zero offset): the same AdamW steps give the same losses and prompts;
    the projection, the label-row gradient mask and the decayed loss all take part."""
    theirs = peft.get_peft_model(build("llama"), peft.CPTConfig(task_type="CAUSAL_LM", **CPT_FIELDS))
    ours = up.adapt(build("llama"), up.CPTConfig(**CPT_FIELDS))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (theirs, ours)]
    for step in range(4):
        lt, lo = _cpt_step(theirs, opts[0], 40 + step), _cpt_step(ours, opts[1], 40 + step)
        torch.testing.assert_close(lo, lt, **TOL)
    theirs.eval(), ours.eval()
    (tmp_path / "peft").mkdir(), (tmp_path / "ours").mkdir()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    p_theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    p_ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(p_theirs) == {"prompt_embeddings"}
    assert set(p_ours) == {"prompt_embeddings", "prompt_encoder.base_prompt", "prompt_encoder.delta_embedding"}
    torch.testing.assert_close(p_ours["prompt_embeddings"], p_theirs["prompt_embeddings"], **TOL)
    offset = ours.deltas("default")[0].delta_embedding.detach()
    assert offset[[0, 1, 2, 3, 5, 6, 7]].abs().max() > 1e-3 and offset[[4, 8]].abs().max() == 0  # labels frozen
    radius = offset.norm(dim=1)
    assert float(radius[[1, 2, 6]].max()) <= 2.0 * (32 / 2048) ** 0.5 + 1e-6  # the input tokens' ball

    batch, labels, types = _cpt_batch(7)
    expected = _logits(theirs, batch)
    with torch.no_grad():
        want_loss = theirs(**batch, labels=labels, input_type_mask=types.clone()).loss
    loaded = up.AdaptedModel.from_pretrained(build("llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, batch), expected, **TOL)
    with torch.no_grad():
        got = loaded(**batch, labels=labels, input_type_mask=types)
    torch.testing.assert_close(got.loss, want_loss, **TOL)
    assert got.logits.shape[1] == batch["input_ids"].shape[1]

    back = _peft_loads(build("llama"), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, batch), expected, **TOL)
    assert (expected - _logits(build("llama"), batch)).abs().max() > 1e-3, "the prompt does nothing"


def test_cpt_config_checks():
    with pytest.raises(up.ConfigError, match="same length"):
        up.CPTConfig(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1])
    with pytest.raises(up.ConfigError, match="CAUSAL_LM"):
        up.CPTConfig(task_type="SEQ_CLS")
    assert up.CPTConfig(cpt_token_ids=[3, 4, 5]).num_virtual_tokens == 3


# ---- Cartridge -------------------------------------------------------------------------------
def test_cartridge_peft_folder_loads_with_identical_outputs(tmp_path):
    cfg = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_frozen_tokens=1)
    theirs = peft.get_peft_model(build("llama"), cfg)
    frozen = theirs.prompt_encoder["default"].frozen_embedding.detach().clone()
    train_steps(theirs, lambda m, s: m(**_batch(s)).logits, seed=50)
    torch.testing.assert_close(theirs.prompt_encoder["default"].frozen_embedding, frozen, rtol=0, atol=0)
    batch = _batch()
    expected = _logits(theirs, batch)
    theirs.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    got = _logits(ours, batch)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - _logits(build("llama"), batch)).abs().max() > 1e-3, "the loaded cartridge does nothing"
    with ours.disable_adapters():
        torch.testing.assert_close(_logits(ours, batch), _logits(build("llama"), batch), rtol=0, atol=0)


def test_cartridge_peft_loads_our_folder_and_the_first_token_stays_frozen(tmp_path):
    ours = up.adapt(build("llama"), up.CartridgeConfig(num_virtual_tokens=N, num_frozen_tokens=1,
                                                       task_type="CAUSAL_LM"))
    before = ours.adapter_state_dict()["prompt_embeddings"].clone()
    train_steps(ours, lambda m, s: m(**_batch(s)).logits, seed=60)
    after = ours.adapter_state_dict()["prompt_embeddings"]
    assert torch.equal(after[:1], before[:1]) and (after[1:] - before[1:]).abs().min() > 0
    batch = _batch()
    expected = _logits(ours, batch)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CARTRIDGE" and "prefix_projection" not in saved
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"prompt_embeddings"}
    theirs = _peft_loads(build("llama"), tmp_path)
    torch.testing.assert_close(_logits(theirs, batch), expected, **TOL)


def test_cartridge_init_from_a_prefill_matches_peft():
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values as peft_init

    ids = _batch()["input_ids"][:1]
    with torch.no_grad():
        cache = build("llama")(input_ids=ids, use_cache=True).past_key_values
    theirs = peft.get_peft_model(build("llama"), peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    want = peft_init(theirs, past_key_values=cache)
    ours = up.adapt(build("llama"), up.CartridgeConfig(num_virtual_tokens=N))
    got = up.initialize_kv_prefix_from_past_key_values(ours, cache)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(ours.adapter_state_dict()["prompt_embeddings"], want, rtol=0, atol=0)
    # The cartridge now holds the prefill of `ids[:, :N]`: continuing from it equals the base on the whole text.
    batch = {"input_ids": ids[:, N:]}
    with torch.no_grad():
        full = build("llama")(input_ids=ids).logits[:, N:]
    torch.testing.assert_close(_logits(ours, batch), full, **TOL)
    with pytest.raises(up.ConfigError, match="num_frozen_tokens"):
        up.CartridgeConfig(num_virtual_tokens=2, num_frozen_tokens=3)
