"""Core seams: delta queries, transactional replacement, per-call inputs, base-weight edits, calibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.methods.lora import INITS, InitResult, LoraLinear, register_init
from unipeft.methods.sparse.selective import DenseDelta

from ..invariants.cases import build_model, make_batch, run


def _lora(kind="mlp", targets=("fc1", "fc2"), **kw):
    return up.adapt(build_model(kind), up.LoraConfig(r=2, target_modules=list(targets), **kw))


# ---- delta queries ------------------------------------------------------------------------
def test_deltas_lists_an_adapters_deltas_in_site_order_by_kind():
    model = _lora()
    model.add_adapter("bias", up.BitFitConfig(target_modules=["fc2"]))
    assert [d.path for d in model.deltas("default")] == ["fc1", "fc2"]
    assert [d.path for d in model.deltas("bias", kind="weight")] == ["fc2"]
    assert model.deltas("bias", kind="output") == []
    assert model.delta_at("default", "fc2") is model.base_model.fc2.deltas["default"]
    with pytest.raises(up.ConfigError, match="no adapter named 'nope'"):
        model.deltas("nope")
    with pytest.raises(up.ConfigError, match="has no delta at 'norm'"):
        model.delta_at("default", "norm")


def test_replace_deltas_is_all_or_nothing():
    model = _lora()
    batch = make_batch("mlp")
    before = {d.path: d for d in model.deltas("default")}
    out = run(model, batch)
    good = DenseDelta(model.base_model.fc1.base_layer, model.peft_config["default"], "fc1")
    with pytest.raises(up.ConfigError, match="not Delta modules"):
        model.replace_deltas("default", {"fc1": good, "fc2": nn.Linear(2, 2)})
    with pytest.raises(up.ConfigError, match="no delta at 'norm'"):
        model.replace_deltas("default", {"fc1": good, "norm": good})
    assert {d.path: d for d in model.deltas("default")} == before
    torch.testing.assert_close(run(model, batch), out, rtol=0, atol=0)
    with torch.no_grad():
        good.weight.normal_()
    old = model.replace_deltas("default", {"fc1": good})
    assert old["fc1"] is before["fc1"] and model.delta_at("default", "fc1") is good
    assert good.weight.requires_grad  # trainable like the delta it replaced
    expected = model.base_model.fc2(model.base_model.norm(model.base_model.act(
        model.base_model.fc1.base_layer(batch["x"]) + batch["x"] @ good.weight.detach().T)))
    torch.testing.assert_close(run(model, batch), expected, rtol=1e-6, atol=1e-6)
    model.merge()
    with pytest.raises(up.MergeError, match="merged"):
        model.replace_deltas("default", {"fc2": before["fc2"]})


def test_replace_deltas_can_swap_the_config_copy():
    model = _lora()
    new_cfg = model.peft_config["default"].replace(alpha=5)
    model.replace_deltas("default", {}, config=new_cfg)
    assert model.peft_config["default"].alpha == 5 and model.peft_config["default"] is not new_cfg
    with pytest.raises(up.ConfigError, match="immutable"):
        model.peft_config["default"].alpha = 6


# ---- per-call inputs ----------------------------------------------------------------------
def test_declared_call_inputs_live_for_one_call_only():
    model = up.adapt(build_model("mlp"), up.PolyConfig(r=2, n_skills=2, n_tasks=2, target_modules=["fc1"]))
    x = make_batch("mlp")["x"]
    seen = []
    model.base_model.fc1.register_forward_pre_hook(lambda m, a: seen.append(dict(model._ctx.inputs)))
    model(x=x, task_ids=torch.zeros(x.shape[0], dtype=torch.long))
    assert list(seen[0]) == ["task_ids"] and model._ctx.inputs == {}
    with pytest.raises(up.ConfigError, match="pass task_ids"):
        model(x=x)  # n_tasks=2 needs them; the last call's ids are gone
    assert model._ctx.inputs == {}


# ---- base-weight edits of inits -----------------------------------------------------------
@pytest.fixture
def residual_init():
    """A PiSSA-like init: A, B from the top singular pairs of W; the base keeps W - scaling * B A."""
    def fn(ctx):
        u, s, vh = torch.linalg.svd(ctx.weight.float(), full_matrices=False)
        a = (s[:ctx.r, None].sqrt() * vh[:ctx.r]).reshape(ctx.a_shape)
        b = (u[:, :ctx.r] * s[:ctx.r].sqrt()).reshape(ctx.b_shape)
        scaling = ctx.config.scaling(ctx.path)
        return InitResult(a, b, ctx.weight - scaling * (b @ a))
    register_init("test_residual", fn)
    yield "test_residual"
    INITS.pop("test_residual")


def test_base_edit_is_applied_and_undone_exactly(residual_init):
    base = build_model("gpt2")  # Conv1D: the edit is written in the transposed storage
    batch = make_batch("gpt2")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    out = run(base, batch)
    model = up.adapt(base, up.LoraConfig(r=2, alpha=2, init=residual_init, target_modules=["c_attn", "c_fc"]))
    w = model.base_model.transformer.h[0].attn.c_attn.base_layer.weight
    assert not torch.equal(w, ref["transformer.h.0.attn.c_attn.weight"])  # the base now holds the residual
    torch.testing.assert_close(run(model, batch), out, rtol=1e-4, atol=1e-4)  # W_res + BA = W
    restored = model.unload()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_edits_are_held_while_their_adapter_is_active_and_delete_in_any_order(residual_init):
    base = build_model("mlp")
    ref = base.fc1.weight.detach().clone()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = base(x)
    model = up.adapt(base, up.LoraConfig(r=2, init=residual_init, target_modules=["fc1"]))
    first = model.base_model.fc1.base_layer.weight.detach().clone()
    assert not torch.equal(first, ref)
    model.add_adapter("b", up.LoraConfig(r=3, init=residual_init, target_modules=["fc1"]))
    layer = model.base_model.fc1.base_layer
    assert torch.equal(layer.weight, first)  # b is not active: its edit is not in the base yet
    model.set_adapter("b")
    second = layer.weight.detach().clone()
    assert not torch.equal(second, first)
    with torch.no_grad():  # each adapter alone starts as the base, its own residual under it
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        model.set_adapter(["default", "b"])  # both: original + both changes (they add, like the deltas)
        torch.testing.assert_close(layer.weight, first + second - ref, rtol=0, atol=1e-6)
        with model.disable_adapters():
            assert torch.equal(layer.weight, ref)
        torch.testing.assert_close(layer.weight, first + second - ref, rtol=0, atol=1e-6)
    model.delete_adapter("default")  # any order: the base then holds b's residual exactly
    assert torch.equal(layer.weight, second)
    model.delete_adapter("b")
    assert isinstance(model.base_model.fc1, nn.Linear) and torch.equal(model.base_model.fc1.weight, ref)


def test_merge_and_unload_keeps_the_edit_plus_the_trained_delta(residual_init):
    base = build_model("mlp")
    w0 = base.fc1.weight.detach().clone()
    model = up.adapt(base, up.LoraConfig(r=2, init=residual_init, target_modules=["fc1"]))
    d: LoraLinear = model.delta_at("default", "fc1")
    with torch.no_grad():
        d.lora_B.weight.add_(0.1)
    expected = (w0 - d.scaling * (d.lora_B.weight - 0.1) @ d.lora_A.weight) + d.scaling * d.lora_weight()
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.fc1.weight, expected, rtol=1e-5, atol=1e-6)


# ---- calibration for data-aware inits -----------------------------------------------------
@pytest.fixture
def data_inits():
    def from_activations(ctx):
        # right singular vectors of the inputs = eigenvectors of their streamed Gram matrix
        _, _, vh = torch.linalg.svd(ctx.stats().gram().double(), full_matrices=False)
        vh = vh.float()
        return InitResult(vh[:ctx.r].reshape(ctx.a_shape).clone(), torch.zeros(ctx.b_shape))

    def from_gradient(ctx):
        g = ctx.stats().gradient
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return InitResult(vh[:ctx.r].reshape(ctx.a_shape).clone(), torch.zeros(ctx.b_shape))
    register_init("test_acts", from_activations, needs="activations")
    register_init("test_grads", from_gradient, needs="gradients")
    yield
    INITS.pop("test_acts")
    INITS.pop("test_grads")


def test_activation_init_sees_each_targets_inputs(data_inits):
    base = build_model("mlp")
    batches = [make_batch("mlp", seed=s) for s in (1, 2)]
    with pytest.raises(up.ConfigError, match="calibration"):
        up.adapt(base, up.LoraConfig(r=2, init="test_acts", target_modules=["fc1", "fc2"]))
    assert isinstance(base.fc1, nn.Linear) and all(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        h = torch.cat([base.norm(base.act(base.fc1(b["x"]))) for b in batches])  # what fc2 receives
    out = run(base, batches[0])
    model = up.adapt(base, up.LoraConfig(r=2, init="test_acts", target_modules=["fc1", "fc2"]),
                     calibration=batches)
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    a = model.delta_at("default", "fc2").lora_A.weight
    proj = lambda m: m.T @ m  # noqa: E731  (singular vectors are defined up to sign: compare the subspaces)
    torch.testing.assert_close(proj(a), proj(vh[:2]), rtol=1e-4, atol=1e-4)
    x = torch.cat([b["x"] for b in batches])
    torch.testing.assert_close(proj(model.delta_at("default", "fc1").lora_A.weight),
                               proj(torch.linalg.svd(x, full_matrices=False)[2][:2]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(model, batches[0]), out, rtol=0, atol=0)  # B = 0: still the identity


def test_gradient_init_gets_the_weight_gradient(data_inits):
    base = build_model("bert")
    batch = {**make_batch("bert"), "labels": torch.tensor([0, 1, 2, 0, 1])}
    ref = build_model("bert")
    loss = ref(**batch).loss
    (g,) = torch.autograd.grad(loss, [ref.bert.encoder.layer[0].attention.self.query.weight])
    model = up.adapt(base, up.LoraConfig(r=2, init="test_grads", target_modules=["query"]), calibration=[batch])
    expected = torch.linalg.svd(g, full_matrices=False)[2][:2]
    got = model.delta_at("default", "bert.encoder.layer.0.attention.self.query").lora_A.weight
    # singular vectors are defined up to sign
    torch.testing.assert_close(got.abs(), expected.abs(), rtol=1e-4, atol=1e-5)
    assert all(not p.requires_grad for p in model.base_model.parameters() if p not in set(
        q for d in model.deltas("default") for q in d.parameters()))
    with pytest.raises(up.ConfigError, match="labels"):
        up.adapt(build_model("bert"), up.LoraConfig(r=2, init="test_grads", target_modules=["query"]),
                 calibration=[make_batch("bert")])


def test_capability_table_lists_lora_strategies_registered_later(residual_init):
    row = next(r for r in up.capability_table() if r["method"] == "lora")
    assert residual_init in row["strategies"]["init"] and "pissa_niter_<int>" in row["strategies"]["init"]
    assert {"lora", "dora", "kasa", "svfit"} <= set(row["strategies"]["variant"])
