"""LoRA's training strategies (LoRA+, LoRA-FA), the LORA peft_type lookup, and dropout p = 0 copying nothing."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import unipeft as up
from unipeft.core.hooks import method_callbacks, method_param_groups
from unipeft.core.registry import method_for_peft_type
from unipeft.train.config import OptimizerConfig
from unipeft.train.optim import build_optimizer, param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embed(ids))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


IDS = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(1))


def loss_of(model) -> torch.Tensor:
    return (model(IDS) - 1.0).pow(2).mean()


def lora_params(model, which: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and f".{which}" in n]


# ---- LoRA+ ------------------------------------------------------------------------------------
def test_loraplus_trainer_groups_carry_the_ratio():
    model = up.adapt(net(), up.LoraPlusConfig(r=2, target_modules=["embed", "fc1", "fc2"], loraplus_lr_ratio=8,
                                             loraplus_lr_embedding=1e-5))
    groups = param_groups(model, OptimizerConfig(lr=1e-3), method_param_groups(model))
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert sorted(by_lr) == [1e-5, 1e-3, 8e-3]
    assert by_lr[8e-3] == {id(p) for p in lora_params(model, "lora_B")}
    assert by_lr[1e-3] == {id(p) for p in lora_params(model, "lora_A")}
    assert by_lr[1e-5] == {id(p) for p in lora_params(model, "lora_embedding_")}


def _two_group_adamw(model, lr, ratio):
    return torch.optim.AdamW([{"params": lora_params(model, "lora_A"), "lr": lr},
                              {"params": lora_params(model, "lora_B"), "lr": lr * ratio}], weight_decay=0.0)


@pytest.mark.parametrize("build", ["helper", "trainer"])
def test_loraplus_steps_equal_a_hand_built_two_group_adamw(build):
    cfg = up.LoraPlusConfig(r=2, alpha=4, target_modules=["fc1", "fc2"], loraplus_lr_ratio=4)
    ours, ref = up.adapt(net(), cfg), up.adapt(net(), cfg)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.copy_(p)
    if build == "helper":
        opt = up.create_loraplus_optimizer(ours, lr=1e-2)
    else:
        opt = build_optimizer(ours, OptimizerConfig(lr=1e-2, weight_decay=0.0), method_param_groups(ours))
    ref_opt = _two_group_adamw(ref, 1e-2, 4)
    for _ in range(3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(model).backward()
            o.step()
    b0 = lora_params(ours, "lora_B")[0]
    assert b0.abs().max() > 0  # B moved off zero
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert len(opt.param_groups) == 2 and {g["lr"] for g in opt.param_groups} == {1e-2, 4e-2}


def test_loraplus_folder_is_peft_lora_and_reloads_as_loraplus(tmp_path):
    model = up.adapt(net(), up.LoraPlusConfig(r=2, target_modules=["fc1", "fc2"], loraplus_lr_ratio=3))
    with torch.no_grad():
        for p in lora_params(model, "lora_B"):
            p.normal_()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["loraplus_lr_ratio"] == 3
    back = up.AdaptedModel.from_pretrained(net(), tmp_path)
    assert isinstance(back.peft_config["default"], up.LoraPlusConfig)
    assert back.peft_config["default"].loraplus_lr_ratio == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores loraplus_* keys
        pm = peft.PeftModel.from_pretrained(net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS), model(IDS), rtol=1e-5, atol=1e-5)


def test_lora_peft_type_resolves_to_plain_lora(monkeypatch):
    from unipeft.core import registry

    assert method_for_peft_type("LORA").name == "lora"
    # Whatever the registration order: strategies registered before "lora" do not win.
    reordered = dict(sorted(registry._METHODS.items(), key=lambda kv: kv[0] == "lora"))
    assert list(reordered)[-1] == "lora"
    monkeypatch.setattr(registry, "_METHODS", reordered)
    assert method_for_peft_type("LORA").name == "lora"
    cfg = up.AdapterConfig.from_dict(up.LoraConfig(target_modules=["fc1"]).to_dict())
    assert type(cfg) is up.LoraConfig


# ---- LoRA-FA ----------------------------------------------------------------------------------
def test_lora_fa_a_is_no_trainable_parameter():
    model = up.adapt(net(), up.LoraFAConfig(r=2, target_modules=["fc1", "fc2"]))
    model.set_adapter("default")
    model.requires_grad_(True)  # even a blanket call cannot make A trainable
    names = [n for n, p in model.named_parameters() if ".deltas." in n]
    assert names and all("lora_B" in n for n in names)
    report = up.trainable_report(model)
    assert [r[3] for r in report.rows] == [16 * 2, 4 * 2]
    assert all(not d.lora_A.weight.requires_grad for d in model.deltas("default"))


def test_lora_fa_a_stays_bit_identical_and_b_gets_the_projected_gradient():
    cfg = up.LoraFAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"])
    model = up.adapt(net(), cfg)
    a0 = {d.path: d.lora_A.weight.clone() for d in model.deltas("default")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=4)
    assert any(type(cb).__name__ == "ProjectGradients" for cb in method_callbacks(model))
    for step in range(4):
        hooks.step_begin()
        opt.zero_grad()
        loss_of(model).backward()
        raw = {d.path: d.lora_B.weight.grad.clone() for d in model.deltas("default")}
        hooks.before_optimizer_step()
        for d in model.deltas("default"):
            a = d.lora_A.weight
            want = raw[d.path] @ torch.linalg.pinv(a @ a.T + 1e-8 * torch.eye(2)) / d.scaling ** 2
            torch.testing.assert_close(d.lora_B.weight.grad, want, rtol=1e-6, atol=1e-7)
        opt.step()
        hooks.step_end()
    for d in model.deltas("default"):
        assert torch.equal(d.lora_A.weight, a0[d.path])
        assert d.lora_B.weight.abs().max() > 0


def test_lora_fa_optimizer_matches_peft_lorafa(monkeypatch):
    import peft.optimizers.lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)  # PEFT would project in bf16
    torch.manual_seed(3)
    pm = peft.get_peft_model(net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    ours = up.adapt(net(), up.LoraFAConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for d in ours.deltas("default"):
            layer = pm.base_model.model.get_submodule(d.path)
            d.lora_A.weight.copy_(layer.lora_A["default"].weight)
    peft_opt = peft.optimizers.create_lorafa_optimizer(pm, r=2, lora_alpha=4, lr=1e-2)
    # PEFT adds eps to sqrt(v) before the bias correction, torch after it: with a negligible eps both
    # compute the same Adam step.
    peft_opt.param_groups[0]["eps"] = 1e-15
    opt = up.create_lorafa_optimizer(ours, lr=1e-2, eps=1e-15)
    for _ in range(3):
        for model, o in ((pm, peft_opt), (ours, opt)):
            o.zero_grad()
            loss_of(model).backward()
            o.step()
    for d in ours.deltas("default"):
        theirs = pm.base_model.model.get_submodule(d.path).lora_B["default"].weight
        assert theirs.abs().max() > 0
        torch.testing.assert_close(d.lora_B.weight, theirs, rtol=1e-4, atol=1e-6)


def test_lora_fa_folder_reloads_as_lora_fa_and_peft_loads_it(tmp_path):
    model = up.adapt(net(), up.LoraFAConfig(r=2, target_modules=["fc1"]))
    with torch.no_grad():
        model.deltas("default")[0].lora_B.weight.normal_()
    model.save_pretrained(tmp_path)
    back = up.AdaptedModel.from_pretrained(net(), tmp_path, is_trainable=True)
    assert isinstance(back.peft_config["default"], up.LoraFAConfig)
    assert [n for n, p in back.named_parameters() if p.requires_grad] == ["base_model.fc1.deltas.default.lora_B.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS), model(IDS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(IDS), model(IDS), rtol=0, atol=0)


def test_lora_fa_refuses_what_it_cannot_do():
    with pytest.raises(up.ConfigError, match=r"LoraFAConfig\.use_dora"):
        up.LoraFAConfig(target_modules=["fc1"], use_dora=True)
    with pytest.raises(up.TargetError, match="lora_fa does not support"):
        up.adapt(net(), up.LoraFAConfig(target_modules=["embed"]))


# ---- dropout p = 0 copies nothing -------------------------------------------------------------
class CopyWatch(TorchDispatchMode):
    """Records every op output the size of the watched input that does not share its storage."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x, self.copies = x, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.x.numel() \
                    and t.untyped_storage().data_ptr() != self.x.untyped_storage().data_ptr():
                self.copies.append(str(func))
        return out


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.0, False), (0.1, False)])
def test_lora_with_inactive_dropout_makes_no_copy_of_the_input(dropout, training, dora):
    """p = 0, or p > 0 in eval mode: the tensor reaching the A projection is the input itself (the
    watch sees every op's output; a dropout mask or a masked copy would be the input's size)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20))
    model = up.adapt(base, up.LoraConfig(r=3, target_modules=["0"], dropout=dropout, use_dora=dora))
    model.train(training)
    x = torch.randn(3, 5, 12, requires_grad=training)
    for _ in range(2):  # the second call runs the learned (fused) path
        with CopyWatch(x) as watch:
            out = model(x)
        assert not watch.copies, watch.copies
        if training:  # (the backward legitimately makes the input's gradient, of the input's size)
            out.sum().backward()
