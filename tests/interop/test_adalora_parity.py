"""AdaLoRA against PEFT: folders load both ways with identical outputs, and our allocator's masks equal
PEFT's RankAllocator's after the same steps on the same model, data and initial weights."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch

import unipeft as up

from ._models import build, inputs, output

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"]}  # gpt2: transposed Conv1D weights
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, beta1=0.85, beta2=0.85)


def _peft_config(kind="bert", **extra):
    return peft.AdaLoraConfig(target_modules=TARGETS[kind], lora_alpha=8, orth_reg_weight=0.3, **{**SCHEDULE, **extra})


def _ours_config(kind="bert", **extra):
    return up.AdaLoraConfig(target_modules=TARGETS[kind], alpha=8, orth_reg_weight=0.3, **{**SCHEDULE, **extra})


def _batch(kind: str, step: int) -> dict:
    batch = inputs(kind, seed=step)
    if kind == "bert":
        return {**batch, "labels": torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(100 + step))}
    return {**batch, "labels": batch["input_ids"]}


def _train_peft(model, steps: int, record: list | None = None, kind: str = "bert"):
    """PEFT's loop: loss (with the orthogonal regulariser PEFT adds) -> backward -> step -> update_and_allocate."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    torch.manual_seed(7)  # the same dropout masks in both loops
    for step in range(1, steps + 1):
        # AdaLoraModel.forward adds the regulariser to the loss (PeftModel.forward without a task type skips it)
        out = model.base_model(**_batch(kind, step))
        out.loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if record is not None:
            pattern = model.peft_config["default"].rank_pattern
            record.append(None if pattern is None else {k.replace(".lora_E.default", ""): list(v)
                                                        for k, v in pattern.items()})
    return model.eval()


def _train_ours(model, steps: int, record: list | None = None, kind: str = "bert"):
    """Our loop: the task loss only (the allocator adds the regulariser's gradient) through TrainingHooks."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=steps)
    allocator = hooks.callbacks.callbacks[0]
    model.train()
    torch.manual_seed(7)
    for step in range(1, steps + 1):
        hooks.step_begin()
        out = model(**_batch(kind, step))
        out.loss.backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.step_end()
        if record is not None:
            record.append({p: list(m) for p, m in allocator.masks.items()} or None)
    return model.eval()


def _peft_model(kind: str = "bert"):
    torch.manual_seed(0)
    return peft.get_peft_model(build(kind), _peft_config(kind))


def _copy_peft_init(ours, pm):
    """Give our deltas PEFT's initial A, B, E (PEFT draws them in its own order)."""
    state = peft.get_peft_model_state_dict(pm)
    up.core.state.load_tensors(ours, "default", {k: v for k, v in state.items()})


def test_allocator_masks_equal_peft_rank_allocator():
    pm = _peft_model()
    ours = up.adapt(build("bert"), _ours_config())
    _copy_peft_init(ours, pm)
    theirs_masks, our_masks = [], []
    _train_peft(pm, 8, theirs_masks)
    _train_ours(ours, 8, our_masks)
    masked_steps = [m for m in theirs_masks if m is not None]
    assert len(masked_steps) >= 5 and any(not all(v) for v in masked_steps[-1].values())
    for step, (theirs, mine) in enumerate(zip(theirs_masks, our_masks), 1):
        if theirs is None:
            assert mine is None, step
            continue
        assert mine == {k.replace(".lora_E", ""): v for k, v in theirs.items()}, step
    # the final pattern is recorded in our config (PEFT's keys) and the deltas hold the kept triplets only
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == {f"{k}.lora_E": v for k, v in theirs_masks[-1].items()}
    for d in ours.deltas("default"):
        assert d.r == sum(pattern[f"{d.path}.lora_E"])


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_peft_folder_loads_in_unipeft(tmp_path, kind):
    pm = _train_peft(_peft_model(kind), 8, kind=kind)
    pm.save_pretrained(tmp_path)
    batch = inputs(kind, seed=42)
    want = output(pm, batch)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path).eval()
    assert isinstance(ours.peft_config["default"], up.AdaLoraConfig)
    assert ours.peft_config["default"].rank_pattern  # the pruned pattern came with the file
    torch.testing.assert_close(output(ours, batch), want, atol=1e-5, rtol=1e-5)
    merged = output(ours.merge_and_unload(), batch)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,steps", [("bert", 3), ("bert", 8), ("gpt2", 8)])  # mid-budget (masked E, full
def test_unipeft_folder_loads_in_peft(tmp_path, kind, steps):                  # shapes) and after the final pattern
    ours = up.adapt(build(kind), _ours_config(kind))
    _train_ours(ours, steps, kind=kind)
    ours.save_pretrained(tmp_path)
    batch = inputs(kind, seed=42)
    want = output(ours, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    # PEFT warns of missing/unexpected keys (its rank_pattern-keys notice comes with its own folders too)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(output(pm, batch), want, atol=1e-5, rtol=1e-5)
    back = up.AdaptedModel.from_pretrained(build(kind), tmp_path).eval()
    torch.testing.assert_close(output(back, batch), want, atol=1e-5, rtol=1e-5)
