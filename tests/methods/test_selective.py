"""Selection rules of the selective methods: LISA, HFT, SPT, S2FT, diff pruning, SpIEL."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import unipeft as up
from unipeft.methods.sparse.base import count_for, sparse_deltas
from unipeft.methods.sparse.selective import DenseDelta
from unipeft.methods.sparse.diff import DiffDense, DiffSparse
from unipeft.methods.sparse.s2ft import S2ftDelta
from unipeft.methods.sparse.spiel import SpielDelta
from unipeft.methods.sparse.spt import SptSparse, sensitivity
from unipeft.methods.lora import LoraLinear

from .test_sara import hooked_step


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return x + self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


class Stack(nn.Module):
    """net.layers.<i>.{a,b,c,d}: four layers of four matrices, plus a head outside the stack."""

    def __init__(self, n: int = 4, d: int = 8) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.net.layers:
            x = layer(x)
        return self.head(x)


TARGETS = ["a", "b", "c", "d", "head"]


def _stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack()


def _batch(seed: int = 1, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)




def _deltas(model, name="default"):
    return {s.path: s.deltas[name] for s in model.sites() if name in s.deltas}


def _snapshot(model):
    return {p: d.weight.detach().clone() for p, d in _deltas(model).items()}


def test_lisa_trains_sampled_layers_and_keeps_others_bit_identical():
    model = up.adapt(_stack(), up.LisaConfig(n_layers=1, interval=3, seed=0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=9)
    x, y = _batch()
    sampled_layers = []
    for period in range(3):
        before = _snapshot(model)
        for _ in range(3):
            hooked_step(model, opt, hooks, x, y)
        after = _snapshot(model)
        changed = {p for p in after if not torch.equal(after[p], before[p])}
        layers = {int(p.split(".")[2]) for p in changed if p.startswith("net.layers.")}
        assert len(layers) == 1, f"period {period}: layers {layers} trained"
        layer = layers.pop()
        assert "head" in changed  # outside the layer stack: always trains
        assert changed == {p for p in after if p == "head" or p.startswith(f"net.layers.{layer}.")}
        # optimizer state exists only for the active updates
        active = {id(d.weight) for p, d in _deltas(model).items() if p in changed}
        assert {id(p) for p in opt.state} == active
        sampled_layers.append(changed)
    assert len({frozenset(c) for c in sampled_layers}) > 1, "the same layer was sampled every period"
    assert all(d.weight.requires_grad for d in _deltas(model).values())  # between steps: all (checkpoints)


def test_hft_trains_exactly_half_of_each_layer_per_round():
    model = up.adapt(_stack(), up.HftConfig(interval=2, seed=0, target_modules=["a", "b", "c", "d"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=6)
    x, y = _batch()
    rounds = []
    for _ in range(3):
        before = _snapshot(model)
        for _ in range(2):
            hooked_step(model, opt, hooks, x, y)
        after = _snapshot(model)
        changed = {p for p in after if not torch.equal(after[p], before[p])}
        trainable = set(hooks.callbacks.callbacks[0].active)
        assert changed == trainable
        for i in range(4):
            assert len([p for p in changed if p.startswith(f"net.layers.{i}.")]) == 2
        total = sum(d.weight.numel() for d in _deltas(model).values())
        assert sum(_deltas(model)[p].weight.numel() for p in changed) * 2 == total
        rounds.append(changed)
    assert rounds[0] != rounds[1] or rounds[1] != rounds[2]


def _spt_loss(model, batch):
    x, y = batch
    out = model(x)
    return (out - y).pow(2).mean()


def test_spt_respects_the_budget_selects_sensitive_entries_and_falls_back_to_lora():
    base = _stack()
    batches = [_batch(s) for s in range(3)]
    paths = [f"net.layers.{i}.{m}" for i in range(4) for m in "abcd"] + ["head"]
    scores = sensitivity(base, paths, batches, _spt_loss)
    assert all(p.requires_grad for p in base.parameters()), "sensitivity left the base's flags changed"
    total = sum(s.numel() for s in scores.values())
    cfg = up.SptConfig(budget=0.2, lora_r=1, target_modules=TARGETS)
    model = up.spt_adapt(base, cfg, batches, _spt_loss)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable <= int(0.2 * total)
    deltas = _deltas(model)
    lora = [p for p, d in deltas.items() if isinstance(d, LoraLinear)]
    sparse = {p: d for p, d in deltas.items() if isinstance(d, SptSparse)}
    assert lora and sparse, (lora, list(sparse))
    saved = model.peft_config["default"]
    assert sorted(saved.lora_modules) == sorted(lora)
    for p in lora:  # LoRA only where the matrix had more sensitive entries than LoRA's parameter count
        out_f, in_f = scores[p].shape
        assert (scores[p] >= torch.topk(torch.cat([s.flatten() for s in scores.values()]),
                                        int(0.2 * total)).values.min()).sum() > 1 * (out_f + in_f)
    for p, d in sparse.items():  # the sparse entries are the matrix's most sensitive ones
        k = d.values.numel()
        assert k == saved.allocation[p]
        assert set(d.indices.tolist()) == set(torch.topk(scores[p].flatten(), k).indices.tolist())


def test_spt_saves_and_reloads_its_allocation(tmp_path):
    base = _stack()
    batches = [_batch(s) for s in range(2)]
    model = up.spt_adapt(base, up.SptConfig(budget=0.2, lora_r=1, target_modules=TARGETS), batches, _spt_loss)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05)
    x, _ = _batch(7)
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(_stack(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPT"


def test_s2ft_trains_only_the_selected_heads_and_channels():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16))  # "2" plays the attention output
    cfg = up.S2ftConfig(ratio=0.34, head_modules=["0"], head_dim=4, seed=3, target_modules=["0", "2"])
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = up.adapt(base, cfg)
    deltas = _deltas(model)
    assert all(isinstance(d, S2ftDelta) for d in deltas.values())
    heads = deltas["0"].channels
    assert heads.numel() == round(0.34 * 4) * 4  # whole heads of 4 channels
    assert all((heads.view(-1, 4) - heads.view(-1, 4)[:, :1] == torch.arange(4)).all(1))
    assert (heads.view(-1, 4)[:, 0] % 4 == 0).all()
    assert deltas["2"].channels.numel() == round(0.34 * 24)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    for _ in range(4):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    merged = model.merge_and_unload()
    for name, path in (("0.weight", "0"), ("2.weight", "2")):
        diff = merged.get_parameter(name) - before[name]
        cols = set(torch.nonzero(diff.abs().sum(0)).flatten().tolist())
        assert cols and cols <= set(deltas[path].channels.tolist())
        assert (diff[:, deltas[path].channels].abs() > 0).any()


def test_diff_pruning_keeps_exactly_the_largest_entries_then_trains_them_only(tmp_path):
    model = up.adapt(_stack(), up.DiffPruningConfig(density=0.25, l1_weight=1e-3, prune_at=0.5,
                                                    target_modules=TARGETS))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=8)
    x, y = _batch()
    for _ in range(3):
        hooked_step(model, opt, hooks, x, y)
    assert all(isinstance(d, DiffDense) for d in _deltas(model).values())
    seen = {}

    def record():  # the dense diff just before pruning
        seen["dense"] = {p: d.weight.detach().clone() for p, d in _deltas(model).items()}
        with torch.no_grad():
            seen["out"] = model(x)

    hooked_step(model, opt, hooks, x, y, before_end=record)  # step 4 = prune_at * 8: prune
    dense, out_dense = seen["dense"], seen["out"]
    assert model.peft_config["default"].phase == "sparse"
    for p, d in _deltas(model).items():
        assert isinstance(d, DiffSparse)
        k = count_for(0.25, dense[p].numel())
        nz = torch.count_nonzero(d.dense_delta())
        assert d.values.numel() == k and nz <= k
        kth = torch.topk(dense[p].abs().flatten(), k).values.min()
        assert (dense[p].abs().flatten()[d.indices.long()] >= kth).all()
        torch.testing.assert_close(d.values.detach(), dense[p].flatten()[d.indices.long()], rtol=0, atol=0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(d.values) for d in _deltas(model).values()}
    with torch.no_grad():
        assert (model(x) - out_dense).abs().max() > 0  # pruning dropped the small entries
    masks = {p: d.indices.clone() for p, d in _deltas(model).items()}
    for _ in range(3):
        hooked_step(model, opt, hooks, x, y)
    for p, d in _deltas(model).items():
        assert torch.equal(d.indices, masks[p])  # the mask stays fixed after pruning
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.head.diff_values" in tensors and "base_model.model.head.diff_indices" in tensors
    loaded = up.AdaptedModel.from_pretrained(_stack(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_spiel_prunes_smallest_and_regrows_largest_gradient_entries():
    model = up.adapt(_stack(), up.SpielConfig(density=0.25, update_every=3, drop_fraction=0.25,
                                              updates_until=1.0, target_modules=["head"]))
    d = sparse_deltas(model, "default", SpielDelta)[0]
    opt = torch.optim.Adam([d.values], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=6)
    x, y = _batch()
    for _ in range(2):
        hooked_step(model, opt, hooks, x, y)
    k = d.values.numel()
    n = round(0.25 * k)
    # step 3 updates the index set: compute what it should become
    hooks.step_begin()
    out = model(x)
    loss = (out - y).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.before_optimizer_step()
    opt.step()
    old_idx, old_vals = d.indices.clone(), d.values.detach().clone()
    old_moment = opt.state[d.values]["exp_avg"].clone()
    with torch.no_grad():  # the dense gradient of that step, by plain autograd
        h = model.base_model.net.layers[-1](model.base_model.net.layers[2](model.base_model.net.layers[1](
            model.base_model.net.layers[0](x))))
    wd = torch.zeros(3, 8, requires_grad=True)
    ref = F.linear(h, model.base_model.head.base_layer.weight + wd.detach(), model.base_model.head.base_layer.bias)
    ref = ref + F.linear(h, d.dense_delta().detach()) + F.linear(h, wd) - F.linear(h, wd.detach())
    ((ref - y).pow(2).mean()).backward()
    dense_grad = wd.grad.abs().flatten()
    dense_grad[old_idx.long()] = -1
    grown_expected = set(torch.topk(dense_grad, n).indices.tolist())
    dropped_expected = set(old_idx[torch.topk(old_vals.abs(), n, largest=False).indices].tolist())
    hooks.step_end()
    new = set(d.indices.tolist())
    assert d.values.numel() == k and d.indices.numel() == k
    assert new == (set(old_idx.tolist()) - dropped_expected) | grown_expected
    for j, flat in enumerate(d.indices.tolist()):  # kept entries keep value and moment; grown ones start at 0
        if flat in grown_expected:
            assert d.values[j] == 0 and opt.state[d.values]["exp_avg"][j] == 0
        else:
            i = old_idx.tolist().index(flat)
            assert d.values[j] == old_vals[i] and opt.state[d.values]["exp_avg"][j] == old_moment[i]


@pytest.mark.parametrize("make", [lambda: up.LisaConfig(target_modules=TARGETS),
                                  lambda: up.HftConfig(target_modules=TARGETS)])
def test_dense_layer_methods_merge_equals_unmerged(make):
    model = up.adapt(_stack(), make())
    with torch.no_grad():
        for d in _deltas(model).values():
            assert isinstance(d, DenseDelta)
            d.weight.normal_(0, 0.1)
    x, _ = _batch()
    with torch.no_grad():
        out = model(x)
        model.merge()
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)


def test_bad_configs_name_the_field():
    with pytest.raises(up.ConfigError, match="head_dim"):
        up.S2ftConfig(head_modules=["o"], target_modules=["o"])
    with pytest.raises(up.ConfigError, match="n_layers"):
        up.LisaConfig(n_layers=0, target_modules=["a"])
    with pytest.raises(up.ConfigError, match="density"):
        up.SpielConfig(density=1.5, target_modules=["a"])
    with pytest.raises(up.ConfigError, match="phase"):
        up.DiffPruningConfig(phase="half", target_modules=["a"])
    with pytest.raises(up.ConfigError, match="allocation"):
        up.SptConfig(allocation={"a": 0}, target_modules=["a"])
