"""Multitask prompt tuning, adaption prompt, CPT and Cartridge beyond PEFT parity: PEFT-named factories, the
capability table, generation, and errors that name what is wrong."""
from __future__ import annotations

import peft
import pytest
import torch

import unipeft as up
from unipeft import compat

from ..interop._models import build

METHODS = {"multitask_prompt_tuning": "MultitaskPromptTuningConfig", "adaption_prompt": "AdaptionPromptConfig",
           "cpt": "CPTConfig", "cartridge": "CartridgeConfig"}


def _ids(rows: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (rows, 6), generator=torch.Generator().manual_seed(seed))


def test_capability_rows_are_honest():
    rows = {r["method"]: r for r in up.capability_table()}
    for name in METHODS:
        row = rows[name]
        assert not row["mergeable"] and not row["mixed_batch"] and row["peft_compatible"], name
        assert row["layer_types"] == ["Embedding"]
    assert rows["adaption_prompt"]["identity_at_init"] and not rows["cpt"]["identity_at_init"]


def test_compat_factories_take_peft_field_names():
    mpt = compat.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2, prompt_tuning_init="RANDOM",
                                             prompt_tuning_init_task=1)
    assert isinstance(mpt, up.MultitaskPromptTuningConfig) and mpt.init_task == 1 and mpt.num_tasks == 2
    ap = compat.AdaptionPromptConfig(target_modules="self_attn", adapter_len=5, adapter_layers=1,
                                     task_type="CAUSAL_LM")
    assert isinstance(ap, up.AdaptionPromptConfig) and ap.attention_module == "self_attn"
    cpt = compat.CPTConfig(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 4], task_type="CAUSAL_LM")
    assert isinstance(cpt, up.CPTConfig) and cpt.num_virtual_tokens == 2
    cart = compat.CartridgeConfig(num_virtual_tokens=3, num_frozen_tokens=0)
    assert isinstance(cart, up.CartridgeConfig) and cart.num_frozen_tokens == 0
    for name, cls_name in METHODS.items():
        assert up.get_method(name).config_cls.peft_class == cls_name == getattr(peft, cls_name).__name__


def test_mpt_generation_with_task_ids_matches_peft(tmp_path):
    theirs = peft.get_peft_model(build("llama"), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=2))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    theirs.eval().save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    ids, tasks = _ids(), torch.tensor([1, 0])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks, **kw)
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks, **kw)
    assert torch.equal(got[:, -4:], want[:, -4:])


def test_mpt_task_id_errors():
    model = up.adapt(build("llama"), up.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=2))
    with pytest.raises(up.ConfigError, match="one per row"):
        model(input_ids=_ids(), task_ids=torch.tensor([0]))
    with pytest.raises(up.ConfigError, match=r"\[0, 2\)"):
        model(input_ids=_ids(), task_ids=torch.tensor([0, 2]))
    single = up.adapt(build("llama"), up.MultitaskPromptTuningConfig(num_virtual_tokens=2))
    with torch.no_grad():  # one task: task_ids may be left out (every row is task 0)
        torch.testing.assert_close(single(input_ids=_ids()).logits,
                                   single(input_ids=_ids(), task_ids=torch.zeros(2, dtype=torch.long)).logits)


def test_cartridge_generation_matches_peft(tmp_path):
    theirs = peft.get_peft_model(build("llama"), peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs.eval().save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    ids = _ids()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(got, want)


def test_adaption_prompt_refusals_name_the_problem():
    with pytest.raises(up.TargetError, match="model type 'bert'"):
        up.adapt(build("bert"), up.AdaptionPromptConfig(target_modules=["word_embeddings"]))
    with pytest.raises(up.TargetError, match="adapter_layers: expected at most the model's 2"):
        up.adapt(build("llama"), up.AdaptionPromptConfig(adapter_layers=3))
    model = up.adapt(build("llama"), up.AdaptionPromptConfig(adapter_len=2))
    model.base_model.gradient_checkpointing_enable()
    model.train()
    before = _hook_count(model)
    with pytest.raises(up.ConfigError, match="gradient checkpointing"):
        model(input_ids=_ids())
    assert _hook_count(model) == before, "a refused call left hooks behind"


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.base_model.modules())


def test_adaption_prompt_hooks_are_removed_when_the_call_fails():
    model = up.adapt(build("llama"), up.AdaptionPromptConfig(adapter_len=2))
    assert _hook_count(model) == 0

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.base_model.model.norm.register_forward_pre_hook(fail)  # after the adapted attention ran
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=_ids())
    handle.remove()
    assert _hook_count(model) == 0, "the failed call left its hooks behind"
    base = build("llama")
    with torch.no_grad():
        torch.testing.assert_close(model.unload()(input_ids=_ids()).logits, base(input_ids=_ids()).logits,
                                   rtol=0, atol=0)


def test_adaption_prompt_next_to_lora_in_the_same_attention():
    """LoRA sites inside the adapted attention: the prompt's keys/values go through them; deleting the adaption
    prompt gives back the LoRA-only model exactly."""
    model = up.adapt(build("llama"), up.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        lora_only = model(input_ids=_ids()).logits
    model.add_adapter("ap", up.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    model.set_adapter(["default", "ap"])
    with torch.no_grad():
        for gate in model.deltas("ap")[0].gates:
            gate.fill_(0.7)
        both = model(input_ids=_ids()).logits
    assert (both - lora_only).abs().max() > 1e-3
    model.delete_adapter("ap")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, lora_only, rtol=0, atol=0)
