"""Rank allocation during training: in-place resizing with optimizer state, checkpoint resume at changed
ranks, SoRA's export, IncreLoRA's growth, TriAdaptLoRA's growth, and budget errors."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.resize import rebuild_adapter, resize_param
from unipeft.train import config_from_dict, partial_dir, train_run

from ..invariants.cases import build_model, make_batch, module_types, no_adapter_modules, run
from ..train._helpers import Crash, crash_at, adapter_tensors, make_tiny_bert, make_word_csv, tiny_config

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.999, 1e-8, 0.01


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))


def _adamw_by_hand(p, g, m, v, t):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    p = p * (1 - LR * WD)
    return p - LR * (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + EPS)


def test_step_after_resize_equals_hand_computed_adamw_on_kept_rows():
    mod = Holder()
    opt = torch.optim.AdamW([mod.w], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    for k in range(2):
        mod.w.grad = torch.full((3, 4), 0.3 + k)
        opt.step()
    old = mod.w
    st = opt.state[old]
    m_old, v_old, w_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), old.detach().clone()
    fill = torch.full((2, 4), 7.0)
    new = resize_param(mod, "w", 0, [2, 0], 4, opt, fill)  # keep rows 2 and 0, two new rows
    assert mod.w is new and opt.param_groups[0]["params"] == [new] and old not in opt.state
    assert new.shape == (4, 4) and torch.equal(new[:2], w_old[[2, 0]]) and torch.equal(new[2:], fill)
    st = opt.state[new]
    assert torch.equal(st["exp_avg"][:2], m_old[[2, 0]]) and not st["exp_avg"][2:].any()
    assert torch.equal(st["exp_avg_sq"][:2], v_old[[2, 0]]) and not st["exp_avg_sq"][2:].any()
    g = torch.arange(16.0).view(4, 4) / 10 - 0.5
    new.grad = g.clone()
    want = _adamw_by_hand(new.detach().clone(), g, st["exp_avg"].clone(), st["exp_avg_sq"].clone(), 3)
    opt.step()
    torch.testing.assert_close(new.detach(), want, atol=1e-6, rtol=1e-6)
    kept = _adamw_by_hand(w_old[[2, 0]], g[:2], m_old[[2, 0]], v_old[[2, 0]], 3)
    torch.testing.assert_close(new.detach()[:2], kept, atol=1e-6, rtol=1e-6)


def _train_plain(model, steps, lr=1e-2, seed=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = up.TrainingHooks(model, opt, max_steps=steps)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        hooks.step_begin()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.step_end()
    return opt


def test_increlora_grows_to_the_budget_and_round_trips(tmp_path):
    model = up.adapt(build_model("mlp"), up.IncreLoraConfig(target_modules=["fc1", "fc2"], budget=7, max_r=5,
                                                            deltaT=2, tinit=1, alpha=8.0))
    assert [d.r for d in model.deltas("default")] == [1, 1]
    opt = _train_plain(model, 12)
    ranks = {d.path: d.r for d in model.deltas("default")}
    assert sum(ranks.values()) == 7 and max(ranks.values()) <= 5
    assert model.peft_config["default"].rank_pattern == ranks
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}  # the optimizer holds the new ones
    for d in model.deltas("default"):
        assert opt.state[d.lora_A]["exp_avg"].shape == d.lora_A.shape
    batch = make_batch("mlp")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == ranks
    back = up.AdaptedModel.from_pretrained(build_model("mlp"), tmp_path)
    torch.testing.assert_close(run(back, batch), run(model, batch), atol=0, rtol=0)


def test_triadaptlora_grows_where_important_without_changing_the_output():
    model = up.adapt(build_model("mlp"), up.TriAdaptLoraConfig(target_modules=["fc1", "fc2"], budget=6, max_r=4,
                                                               deltaT=1, tau_start=0.5, tau_end=0.0,
                                                               growth_steps=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=8)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    grown = 0
    for _ in range(8):
        hooks.step_begin()
        (model(x) - 1).pow(2).mean().backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before_r, before = sum(d.r for d in model.deltas("default")), run(model, {"x": x})
        hooks.step_end()
        if sum(d.r for d in model.deltas("default")) > before_r:
            grown += 1
            torch.testing.assert_close(run(model, {"x": x}), before, atol=1e-6, rtol=0)  # growth changes nothing
    ranks = [d.r for d in model.deltas("default")]
    assert grown > 0 and sum(ranks) == 6 and model.peft_config["default"].rank_pattern == {"fc1": ranks[0],
                                                                                          "fc2": ranks[1]}
    for d in model.deltas("default"):  # the two packed triangles are exactly M's r x r entries
        m, r = d.rank_matrix().detach(), d.r
        assert d.lora_L.numel() + d.lora_U.numel() == r * r
        rows, cols = torch.tril_indices(r, r)
        assert torch.equal(m[rows, cols], d.lora_L.detach())
        assert torch.equal(torch.triu(m, 1).T[torch.tril_indices(r, r, -1).unbind()], d.lora_U.detach())


def _sora_trained():
    """A SoRA adapter trained a little, whose proximal step then zeroes chosen gates."""
    model = up.adapt(build_model("mlp"), up.SoraConfig(target_modules=["fc1", "fc2"], r=4, sparse_lambda=0.1))
    _train_plain(model, 6, lr=2e-2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    hooks = up.TrainingHooks(model, opt, max_steps=1)
    fc1, fc2 = model.deltas("default")
    with torch.no_grad():
        fc1.lora_gate[[1, 3]] = torch.tensor([0.05, -0.08])  # within lr * sparse_lambda = 0.1 of zero
        fc2.lora_gate[0] = 0.09
    gates = [d.lora_gate.detach().clone() for d in (fc1, fc2)]
    hooks.step_end()  # no gradient step: only the proximal operator
    return model, gates


def test_sora_proximal_step_soft_thresholds_the_gates():
    model, before = _sora_trained()
    for d, g in zip(model.deltas("default"), before):
        want = torch.sign(g) * torch.clamp(g.abs() - 0.1, min=0)
        torch.testing.assert_close(d.lora_gate.detach(), want, atol=1e-7, rtol=0)
    assert [d.live_ranks() for d in model.deltas("default")] == [[0, 2], [1, 2, 3]]


def test_sora_export_is_a_smaller_plain_lora_with_equal_outputs(tmp_path):
    model, _ = _sora_trained()
    batch = make_batch("mlp")
    want = run(model, batch)
    lora = up.export_sora_lora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and isinstance(lora, up.LoraConfig)
    back = up.AdaptedModel.from_pretrained(build_model("mlp"), tmp_path)
    assert {d.path: d.r for d in back.deltas("default")} == {"fc1": 2, "fc2": 3}
    torch.testing.assert_close(run(back, batch), want, atol=1e-6, rtol=1e-6)
    pm = peft.PeftModel.from_pretrained(build_model("mlp"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch), want, atol=1e-6, rtol=1e-6)


def test_rebuild_adapter_swaps_the_optimizers_parameters():
    model = up.adapt(build_model("mlp"), up.IncreLoraConfig(target_modules=["fc1", "fc2"], budget=6))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = model.peft_config["default"].replace(rank_pattern={"fc1": 3, "fc2": 2})
    rebuild_adapter(model, "default", cfg, opt)
    assert [d.r for d in model.deltas("default")] == [3, 2]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [
    lambda: up.AdaLoraConfig(target_modules=["fc1"], init_r=4, target_r=6, total_step=10),
    lambda: up.AdaLoraConfig(target_modules=["fc1"], init_r=4, target_r=2, total_step=10, tinit=6, tfinal=4),
    lambda: up.AdaLoraConfig(target_modules=["fc1"], init_r=4, target_r=2, total_step=0),
])
def test_adalora_schedule_errors_name_the_field(make):
    with pytest.raises(up.ConfigError, match=r"AdaLoraConfig\.(target_r|tinit/tfinal|total_step)"):
        make()


def test_adalora_total_step_defaults_to_the_runs_steps():
    model = up.adapt(build_model("mlp"), up.AdaLoraConfig(target_modules=["fc1", "fc2"], init_r=3, target_r=1,
                                                          tinit=1, tfinal=1))
    _train_plain(model, 6)
    cfg = model.peft_config["default"]
    assert cfg.total_step == 6 and sum(sum(m) for m in cfg.rank_pattern.values()) == 2
    short = up.adapt(build_model("mlp"), up.AdaLoraConfig(target_modules=["fc1"], tinit=3, tfinal=3))
    with pytest.raises(up.ConfigError, match=r"AdaLoraConfig\.tinit/tfinal.*total_step=6"):
        _train_plain(short, 6)
    assert short.peft_config["default"].total_step is None


def test_default_budget_is_four_per_module():
    model = up.adapt(build_model("mlp"), up.IncreLoraConfig(target_modules=["fc1", "fc2"]))
    assert model.peft_config["default"].budget == 8


@pytest.mark.parametrize("make", [
    lambda: up.IncreLoraConfig(target_modules=["fc1", "fc2"], budget=1),
    lambda: up.TriAdaptLoraConfig(target_modules=["fc1", "fc2"], budget=3, init_r=2),
])
def test_budget_below_the_starting_ranks_leaves_the_model_unchanged(make):
    model = build_model("mlp")
    types, before = module_types(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(up.ConfigError, match=r"LoraConfig\.budget.*(2|4) ranks"):
        up.adapt(model, make())
    assert module_types(model) == types and no_adapter_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# ---- checkpoint resume with ranks changed mid-run -------------------------------------------


@pytest.fixture(scope="module")
def bert_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    return make_tiny_bert(root / "bert"), make_word_csv(root / "words.csv")


METHODS = {
    "increlora": {"name": "increlora", "budget": 9, "init_r": 1, "max_r": 4, "deltaT": 3, "alpha": 8.0,
                  "dropout": 0.1, "target_modules": ["query", "value"]},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "total_step": 15, "tinit": 2, "tfinal": 4,
                "deltaT": 2, "alpha": 16, "target_modules": ["query", "value"]},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_rank_changes_continues_with_the_same_losses(bert_and_data, tmp_path, method):
    bert, data = bert_and_data

    def cfg(out):
        return config_from_dict(tiny_config(bert, data, out, method=METHODS[method], save_every=4,
                                            keep_checkpoints=1, eval_every=5, optimizer={"weight_decay": 0.1}))

    def records(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]

    quiet = dict(show_progress=False, log=lambda *_: None)
    ref = tmp_path / "ref"
    train_run(cfg(ref), **quiet)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train_run(cfg(out), callbacks=[crash_at(14)], **quiet)
    ckpt = partial_dir(out) / "checkpoints" / "step-0000012"
    saved = json.loads((ckpt / "adapters.json").read_text())["default"]
    assert saved["rank_pattern"]  # the checkpoint was written after ranks changed
    train_run(cfg(out), resume=True, **quiet)
    assert records(out) == records(ref)
    want, got = adapter_tensors(ref), adapter_tensors(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    final = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert final["rank_pattern"] == json.loads((ref / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
