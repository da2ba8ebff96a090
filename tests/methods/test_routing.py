"""Composition and routing: stack, parallel average, AdapterFusion, ScaLearn, Poly / MHR / MHR-mu."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(3))


def _noise(model, name, scale=0.5):
    with torch.no_grad():
        for site in model.sites():
            if name in site.deltas:
                for i, p in enumerate(site.deltas[name].parameters()):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i + len(name))) * scale)


def _two_sources(style="houlsby"):
    model = up.adapt(Net(), up.BottleneckConfig(style=style, r=3, target_modules=["fc1"]), "a")
    model.add_adapter("b", up.BottleneckConfig(style=style, r=3, target_modules=["fc1"]))
    _noise(model, "a")
    _noise(model, "b")
    return model


def _adapter_out(model, name, x, h):
    d = model.base_model.fc1.deltas[name]
    return d(x, h) - h


def test_stack_applies_adapters_in_order():
    model = _two_sources()
    model.set_adapter(["a", "b"])
    base1 = model.base_model.fc1.base_layer
    with torch.no_grad():
        h = base1(X)
        h = model.base_model.fc1.deltas["a"](X, h)
        h = model.base_model.fc1.deltas["b"](X, h)
        torch.testing.assert_close(model(X), model.base_model.fc2(torch.relu(h)), rtol=1e-6, atol=1e-6)
        model.set_adapter(["b", "a"])
        assert (model(X) - model.base_model.fc2(torch.relu(h))).abs().max() > 1e-5  # order matters


@pytest.mark.parametrize("mode", ["average", "fusion", "scalearn"])
def test_fused_modes_start_from_the_average_of_the_sources(mode):
    model = _two_sources()
    up.fuse(model, "fused", ["a", "b"], mode=mode)
    assert model.active_adapters == ["fused"]
    fused = model.base_model.fc1.deltas["fused"]
    if mode == "fusion":  # Q = 0 gives uniform attention; V is the identity at init
        with torch.no_grad():
            fused.fusion_query.zero_()
    with torch.no_grad():
        h = model.base_model.fc1.base_layer(X)
        mean = (_adapter_out(model, "a", X, h) + _adapter_out(model, "b", X, h)) / 2
        torch.testing.assert_close(fused(X, h), h + mean, rtol=1e-5, atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    expected = {"average": set(), "fusion": {"fusion_query", "fusion_key", "fusion_value"},
                "scalearn": {"scalearn_scales"}}[mode]
    assert trainable == expected


def test_scalearn_one_hot_scales_select_one_source_and_fusion_learns(tmp_path):
    model = _two_sources(style="parallel")
    up.fuse(model, "sl", ["a", "b"], mode="scalearn")
    d = model.base_model.fc1.deltas["sl"]
    with torch.no_grad():
        d.scalearn_scales.copy_(torch.tensor([[1.0] * 8, [0.0] * 8]))
        h = model.base_model.fc1.base_layer(X)
        torch.testing.assert_close(d(X, h), model.base_model.fc1.deltas["a"](X, h), rtol=1e-5, atol=1e-5)
    out = model(X)
    model.save_pretrained(tmp_path, adapter_names=["sl"])
    loaded = up.AdaptedModel.from_pretrained(Net(), tmp_path / "sl")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), out, rtol=0, atol=0)  # frozen sources travel with the adapter


def test_fuse_refuses_bad_sources():
    model = _two_sources()
    model.add_adapter("lora", up.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(up.ConfigError, match="bottleneck"):
        up.fuse(model, "f", ["a", "lora"])
    with pytest.raises(up.ConfigError, match="no adapter named"):
        up.fuse(model, "f", ["a", "zz"])
    model.add_adapter("wide", up.BottleneckConfig(r=5, target_modules=["fc1"]))
    with pytest.raises(up.ConfigError, match="share"):
        up.fuse(model, "f", ["a", "wide"])
    assert "f" not in model.peft_config


# ---- Poly / MHR ---------------------------------------------------------------------------------
def _poly(**kw):
    cfg = up.PolyConfig(target_modules=["fc1", "fc2"], r=4, n_skills=3, **kw)
    model = up.adapt(Net(), cfg)
    _noise(model, "default")
    return model


def test_poly_routes_each_row_by_its_task_id():
    model = _poly(n_tasks=2)
    ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = model(x=X, task_ids=ids)
        per_task = {t: model(x=X, task_ids=torch.full((4,), t)) for t in (0, 1)}
    for i, t in enumerate(ids.tolist()):
        torch.testing.assert_close(out[i], per_task[t][i], rtol=1e-5, atol=1e-5)
    assert (per_task[0] - per_task[1]).abs().max() > 1e-4
    # The task's adapter is the weighted mix of the inventory's LoRA pairs.
    d = model.base_model.fc1.deltas["default"]
    a, b = d.mixed(1)
    model._ctx.inputs = {"task_ids": torch.tensor([1])}  # what a model call with task_ids holds
    base = model.base_model.fc1.base_layer
    with torch.no_grad():
        got = d(X[1:2], base(X[1:2]))
        torch.testing.assert_close(got, base(X[1:2]) + X[1:2] @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_mhr_heads_route_rank_slices_separately_and_mu_averages():
    model = _poly(n_tasks=2, routing="mhr", n_splits=2)
    d = model.base_model.fc1.deltas["default"]
    assert d.router_logits.shape == (2, 2, 3)
    model._ctx.inputs = {"task_ids": torch.tensor([0])}
    w = d.weights(1, "cpu")[0]  # (rank, skills)
    torch.testing.assert_close(w[0], w[1])  # same head
    assert (w[0] - w[2]).abs().max() > 1e-4  # different heads
    mu = _poly(routing="mhr_mu")
    dm = mu.base_model.fc1.deltas["default"]
    assert dm.router_logits is None
    a, b = dm.mixed(0)
    torch.testing.assert_close(a, dm.lora_A.mean(0))
    torch.testing.assert_close(b, dm.lora_B.mean(0))


def test_task_ids_are_checked():
    model = _poly(n_tasks=2)
    with pytest.raises(up.ConfigError, match="task_ids"):
        model(x=X)
    with pytest.raises(up.ConfigError, match="task_ids"):
        model(x=X, task_ids=torch.tensor([0, 1, 2, 0]))
    single = _poly()
    with torch.no_grad():
        torch.testing.assert_close(single(x=X), single(x=X, task_ids=torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("kwargs, match", [({"routing": "poly", "n_splits": 2}, "mhr"),
                                           ({"routing": "mhr", "n_splits": 3}, "divisible"),
                                           ({"n_skills": 0}, "n_skills"), ({"routing": "moe"}, "routing")])
def test_poly_bad_config(kwargs, match):
    with pytest.raises(up.ConfigError, match=match):
        up.PolyConfig(target_modules=["fc1"], r=4, **kwargs)
