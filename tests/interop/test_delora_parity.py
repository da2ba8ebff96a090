"""DeLoRA against PEFT's DeloraConfig: folders load both ways with identical outputs; the norm bound holds."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

import unipeft as up

from ._models import build, inputs, output

TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}


def _out(model, kind, seed=1):
    with torch.no_grad():
        return output(model, inputs(kind, seed))


def _perturb(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if "delora_" in n):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_saved_folder_loads_with_identical_outputs(kind, tmp_path):
    # BERT's weights are small (std 0.02), and so are DeLoRA's updates, which scale with them.
    lam = 3 if kind == "llama" else 60
    cfg = peft.DeloraConfig(r=4, delora_lambda=lam, target_modules=TARGETS[kind], rank_pattern={"v_proj": 2},
                            lambda_pattern={"query": 2 * lam})
    torch.manual_seed(0)
    pm = peft.get_peft_model(build(kind), cfg).eval()
    _perturb(pm)
    expected = _out(pm, kind)
    assert (expected - _out(build(kind), kind)).abs().max() > 1e-3
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    assert type(ours.peft_config["default"]).method == "delora"
    torch.testing.assert_close(_out(ours, kind), expected, **TOL)
    ours.merge()
    torch.testing.assert_close(_out(ours, kind), expected, **TOL)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_loads_ours_with_no_missing_or_unexpected_keys(kind, tmp_path):
    lam = 3 if kind == "llama" else 60
    ours = up.adapt(build(kind), up.DeloraConfig(r=4, delora_lambda=lam, target_modules=TARGETS[kind]))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        _out_train = output(ours, inputs(kind, seed=20 + step))
        (_out_train - 1.0).pow(2).mean().backward()
        opt.step()
    ours.eval().save_pretrained(tmp_path)
    assert (_out(ours, kind) - _out(build(kind), kind)).abs().max() > 1e-4
    pm = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    result = set_peft_model_state_dict(pm, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "delora" in k]
    torch.testing.assert_close(_out(pm, kind), _out(ours, kind), **TOL)


def test_same_seed_gives_peft_initial_tensors():
    torch.manual_seed(7)
    pm = peft.get_peft_model(build("llama"), peft.DeloraConfig(r=3, target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(7)
    ours = up.adapt(build("llama"), up.DeloraConfig(r=3, target_modules=["q_proj", "o_proj"]))
    theirs = peft.get_peft_model_state_dict(pm)
    mine = ours.adapter_state_dict()
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k


def test_update_norm_is_bounded_by_lambda_and_the_weight_norms():
    """||dW||_F <= lambda * max_j ||W_:,j||, whatever A and B become (the decoupling of DeLoRA)."""
    model = up.adapt(build("llama"), up.DeloraConfig(r=4, delora_lambda=2, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    for delta in model.deltas("default"):
        with torch.no_grad():
            delta.delora_A.copy_(torch.randn(delta.delora_A.shape, generator=g) * 10)
            delta.delora_B.copy_(torch.randn(delta.delora_B.shape, generator=g) * 10)
            dw = delta.delta_weight()["weight"]
            w_norm = delta.base.weight.norm(dim=0)
        torch.testing.assert_close(delta.delora_w_norm, w_norm)
        bound = 2 * w_norm.max()
        assert 0.1 * bound < dw.norm() <= bound * (1 + 1e-6)


def test_bad_fields_name_the_field():
    with pytest.raises(up.ConfigError, match=r"DeloraConfig\.bias"):
        up.DeloraConfig(target_modules=["q_proj"], bias="all")
    with pytest.raises(up.ConfigError, match=r"DeloraConfig\.delora_lambda"):
        up.DeloraConfig(target_modules=["q_proj"], delora_lambda=0)
    with pytest.raises(up.ConfigError, match=r"DeloraConfig\.lambda_pattern"):
        up.DeloraConfig(target_modules=["q_proj"], lambda_pattern={"q_proj": -1})
