"""LoHa and LoKr (methods/lycoris/): the identity at init, the update's math and factor forms, merge, exact
save/load, what trains, rank/module dropout in training, bad configs, mixed batches, and the gradients of
the CP forms against finite differences."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.site import BASE_NAME
from unipeft.methods.lycoris import factorization
from tests.interop._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)
BERT = ["query", "value", "intermediate.dense", "classifier"]
CONV = ["conv1", "conv2", "head"]

CONFIGS = {
    "loha-bert": ("bert", lambda: up.LoHaConfig(r=4, alpha=8, target_modules=BERT, rank_pattern={"value": 2})),
    "loha-conv-flat": ("conv", lambda: up.LoHaConfig(r=2, alpha=3, target_modules=CONV)),
    "loha-conv-cp": ("conv", lambda: up.LoHaConfig(r=2, alpha=3, target_modules=CONV, use_effective_conv2d=True)),
    "lokr-bert": ("bert", lambda: up.LoKrConfig(r=4, alpha=8, target_modules=BERT, alpha_pattern={"query": 2})),
    "lokr-bert-both": ("bert", lambda: up.LoKrConfig(r=1, target_modules=BERT, decompose_both=True,
                                                     decompose_factor=4)),
    "lokr-conv-whole": ("conv", lambda: up.LoKrConfig(r=4, target_modules=CONV)),
    "lokr-conv-cp": ("conv", lambda: up.LoKrConfig(r=1, target_modules=CONV, use_effective_conv2d=True,
                                                   decompose_both=True)),
    "lokr-conv-lycoris-init": ("conv", lambda: up.LoKrConfig(r=1, target_modules=CONV, init_weights="lycoris")),
}


def _out(model, kind, seed=3):
    with torch.no_grad():
        return output(model, inputs(kind, seed=seed))


def _perturb(model, name="default", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in model.deltas(name):
            for _, p in sorted(delta.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _params(model, name="default"):
    return {f"{d.path}.{k}": p for d in model.deltas(name) for k, p in d.named_parameters()}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_fresh_adapter_is_the_identity_and_not_a_zero_adapter(case):
    kind, make = CONFIGS[case]
    base_out = _out(build(kind), kind)
    model = up.adapt(build(kind), make())
    torch.testing.assert_close(_out(model, kind), base_out, rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for p in _params(model).values()), "every factor is zero"
    _perturb(model)
    assert (_out(model, kind) - base_out).abs().max() > 1e-3, "the perturbed adapter changes nothing"


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_init_weights_false_is_not_the_identity(method):
    cls = up.LoHaConfig if method == "loha" else up.LoKrConfig
    model = up.adapt(build("conv"), cls(r=2, target_modules=CONV, init_weights=False))
    assert all(not d.identity_at_init for d in model.deltas("default"))
    assert (_out(model, "conv") - _out(build("conv"), "conv")).abs().max() > 1e-4


def test_loha_update_is_the_scaled_hadamard_product():
    model = up.adapt(build("bert"), up.LoHaConfig(r=3, alpha=5, target_modules=["query"]))
    _perturb(model)
    d = model.deltas("default")[0]
    expected = (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b) * (5 / 3)
    torch.testing.assert_close(d.delta_weight()["weight"], expected, rtol=0, atol=0)
    assert d.hada_w1_a.shape == (32, 3) and d.hada_w1_b.shape == (3, 32)


def test_loha_cp_form_on_conv_rebuilds_the_kernel():
    model = up.adapt(build("conv"), up.LoHaConfig(r=2, target_modules=["conv1", "conv2"], use_effective_conv2d=True))
    _perturb(model)
    conv1, conv2 = model.deltas("default")
    assert conv2.hada_t1.shape == (2, 2, 3, 3) and conv2.hada_w1_a.shape == (2, 8) and conv2.hada_w1_b.shape == (2, 6)
    assert conv1.hada_t1.shape == (2, 2, 3, 1)  # Conv1d: a (k, 1) core
    t, a, b = conv2.hada_t1, conv2.hada_w1_a, conv2.hada_w1_b
    w1 = torch.stack([torch.stack([(a[:, o, None, None, None] * b[None, :, i, None, None] * t).sum((0, 1))
                                   for i in range(6)]) for o in range(8)])
    t, a, b = conv2.hada_t2, conv2.hada_w2_a, conv2.hada_w2_b
    w2 = torch.einsum("ijkl,io,jn->onkl", t, a, b)
    torch.testing.assert_close(conv2.delta_weight()["weight"], w1 * w2 * conv2.scaling, **TOL)


def test_factorization_examples():
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16) and factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32) and factorization(8, 4) == (4, 2)  # a dividing factor is kept first
    assert factorization(128, 3) == (2, 64) and factorization(1) == (1, 1) and factorization(12) == (3, 4)


def test_lokr_factor_forms_and_kronecker_update():
    config = up.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=["query", "intermediate.dense"])
    model = up.adapt(build("bert"), config)
    _perturb(model)
    by_path = {d.path: d for d in model.deltas("default")}
    query = by_path["bert.encoder.layer.0.attention.self.query"]
    inter = by_path["bert.encoder.layer.0.intermediate.dense"]
    # 32 = 4 * 8 both ways: r = 1 < 8/2 splits W2 and (decompose_both) r < 4/2 splits W1.
    assert {k: tuple(p.shape) for k, p in query.named_parameters()} == {
        "lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    expected = torch.kron(query.lokr_w1_a @ query.lokr_w1_b, query.lokr_w2_a @ query.lokr_w2_b) * 3.0
    torch.testing.assert_close(query.delta_weight()["weight"], expected, rtol=0, atol=0)
    assert inter.lokr_w1_a.shape == (5, 1) and inter.lokr_w2_b.shape == (1, 8)  # out 40 = 5 * 8, in 32 = 4 * 8
    whole = up.adapt(build("bert"), up.LoKrConfig(r=4, target_modules=["query"])).deltas("default")[0]
    assert {k for k, _ in whole.named_parameters()} == {"lokr_w1", "lokr_w2"}  # r = 4 >= 8/2: W2 whole


def test_lokr_conv_forms():
    cp = up.adapt(build("conv"), up.LoKrConfig(r=1, target_modules=CONV, use_effective_conv2d=True))
    shapes = {d.path: {k: tuple(p.shape) for k, p in d.named_parameters()} for d in cp.deltas("default")}
    assert shapes["conv2"] == {"lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 3)}
    assert shapes["conv1"]["lokr_t2"] == (1, 1, 3, 1)
    assert shapes["head"] == {"lokr_w1": (1, 8), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 16)}  # Linear: no core
    flat = up.adapt(build("conv"), up.LoKrConfig(r=1, target_modules=["conv2"])).deltas("default")[0]
    assert flat.lokr_w2_b.shape == (1, 3 * 9)
    whole = up.adapt(build("conv"), up.LoKrConfig(r=4, target_modules=["conv1", "conv2"])).deltas("default")
    assert whole[0].lokr_w2.shape == (3, 3, 3) and whole[1].lokr_w2.shape == (4, 3, 3, 3)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_merged_equals_unmerged_and_unmerge_restores(case):
    kind, make = CONFIGS[case]
    model = up.adapt(build(kind), make())
    _perturb(model)
    before = _out(model, kind)
    weights = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.merge()
    torch.testing.assert_close(_out(model, kind), before, **TOL)
    model.unmerge()
    for k, v in model.base_model.state_dict().items():
        torch.testing.assert_close(v, weights[k], **TOL, msg=k)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_out(merged, kind), before, **TOL)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_save_load_round_trip_is_exact(case, tmp_path):
    kind, make = CONFIGS[case]
    model = up.adapt(build(kind), make())
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    fields = [{k: v for k, v in m.peft_config["default"].to_dict().items() if k != "inference_mode"}
              for m in (model, loaded)]
    assert fields[0] == fields[1]
    torch.testing.assert_close(_out(loaded, kind), _out(model, kind), rtol=0, atol=0)
    mine, theirs = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("case", ["loha-bert", "lokr-conv-cp"])
def test_only_adapter_parameters_train(case):
    kind, make = CONFIGS[case]
    model = up.adapt(build(kind), make())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {id(p) for p in _params(model).values()}
    assert trainable and all(id(p) in adapter for n, p in model.named_parameters() if p.requires_grad)
    base = {k: v.clone() for k, v in model.base_model.state_dict().items() if "hada_" not in k and "lokr_" not in k}
    start = {k: p.detach().clone() for k, p in _params(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        out = output(model, inputs(kind, seed=step))
        (out ** 2).mean().backward()
        opt.step()
    now = model.base_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items()), "a base weight changed"
    moved = [k for k, p in _params(model).items() if not torch.equal(p.detach(), start[k])]
    assert len(moved) == len(start), f"untrained factors: {sorted(set(start) - set(moved))}"


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_module_dropout_skips_the_whole_update_in_training_only(method):
    cls = up.LoHaConfig if method == "loha" else up.LoKrConfig
    model = up.adapt(nn.Sequential(nn.Linear(8, 6)), cls(r=2, target_modules=["0"], module_dropout=0.5)).eval()
    _perturb(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        full, base = model(x), model.base_model[0].base_layer(x)
        model.train()
        torch.manual_seed(0)
        seen = [model(x) for _ in range(40)]
    assert (full - base).abs().max() > 1e-3
    hits = [bool(torch.allclose(o, full)) for o in seen]
    assert all(h or torch.equal(o, base) for h, o in zip(hits, seen))
    assert 5 < sum(hits) < 35  # both outcomes, about half each


@pytest.mark.parametrize("method,renormalised", [("loha", True), ("lokr", False), ("lokr", True)])
def test_rank_dropout_zeroes_output_rows_of_the_update(method, renormalised):
    extra = {} if method == "loha" else {"rank_dropout_scale": renormalised}
    cls = up.LoHaConfig if method == "loha" else up.LoKrConfig
    model = up.adapt(nn.Sequential(nn.Linear(8, 16)), cls(r=2, target_modules=["0"], rank_dropout=0.5, **extra))
    model.eval()
    _perturb(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        base = model.base_model[0].base_layer(x)
        full = model(x) - base
        model.train()
        torch.manual_seed(1)
        dropped = model(x) - base
    kept = dropped.abs().sum(0) > 0
    assert 0 < int(kept.sum()) < 16
    factor = 16 / int(kept.sum()) if renormalised else 1.0
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * factor, **TOL)


def test_bad_configs_name_the_field():
    bad = [
        (up.LoHaConfig, {"r": 0}, r"LoHaConfig\.r: expected a positive integer"),
        (up.LoHaConfig, {"alpha": "8"}, r"LoHaConfig\.alpha: expected a finite number"),
        (up.LoKrConfig, {"rank_dropout": 1.0}, r"LoKrConfig\.rank_dropout: expected 0 <= rank_dropout < 1"),
        (up.LoHaConfig, {"module_dropout": -0.1}, r"LoHaConfig\.module_dropout"),
        (up.LoHaConfig, {"init_weights": "lycoris"}, r"LoHaConfig\.init_weights: expected True or False"),
        (up.LoKrConfig, {"init_weights": "gaussian"}, r"LoKrConfig\.init_weights: expected True, False or 'lycoris'"),
        (up.LoKrConfig, {"decompose_factor": 0}, r"LoKrConfig\.decompose_factor: expected -1"),
        (up.LoKrConfig, {"decompose_both": 1}, r"LoKrConfig\.decompose_both: expected True or False"),
        (up.LoKrConfig, {"rank_pattern": {"query": 0}}, r"LoKrConfig\.rank_pattern\['query'\]"),
        (up.LoHaConfig, {"alpha_pattern": {"query": None}}, r"LoHaConfig\.alpha_pattern\['query'\]"),
        (up.LoHaConfig, {"layers_pattern": "layer"}, r"LoHaConfig\.layers_pattern: .*layers_to_transform"),
    ]
    for cls, fields, pattern in bad:
        with pytest.raises(up.ConfigError, match=pattern):
            cls(target_modules=["query"], **fields)
    with pytest.raises(up.ConfigError, match=r"LoKrConfig.*'use_dora'=True"):
        up.AdapterConfig.from_dict({"peft_type": "LOKR", "r": 2, "use_dora": True})


def test_gpt2_conv1d_and_unsupported_layers_are_refused_untouched():
    model = build("gpt2")
    before = _out(model, "gpt2")
    for cls in (up.LoHaConfig, up.LoKrConfig):
        with pytest.raises(up.TargetError, match=r"'transformer\.h\.0\.attn\.c_attn' is a Conv1D"):
            up.adapt(model, cls(target_modules=["c_attn"]))
    torch.testing.assert_close(_out(model, "gpt2"), before, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_mixed_batch_rows_equal_per_adapter_runs():
    kind = "bert"
    model = up.adapt(build(kind), up.LoHaConfig(r=2, target_modules=["query", "value"]), "a")
    model.add_adapter("b", up.LoKrConfig(r=1, decompose_both=True, target_modules=["value", "intermediate.dense"]))
    _perturb(model, "a", seed=1)
    _perturb(model, "b", seed=2)
    batch = inputs(kind, seed=5)
    expected = {BASE_NAME: _out(build(kind), kind, seed=5)}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = _out(model, kind, seed=5)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-3
    rows = ["b", BASE_NAME, "a", "b"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=rows).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], **TOL, msg=lambda m: f"row {i} ({name}): {m}")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_cp_factor_gradients_match_finite_differences(method):
    """In float64, <grad, v> of every factor of the CP forms equals the central difference along a random v."""
    cls = up.LoHaConfig if method == "loha" else up.LoKrConfig
    r = 2 if method == "loha" else 1  # LoKr keeps W2 whole (no core) when r >= max(4, 3) / 2
    model = up.adapt(build("conv").double(), cls(r=r, target_modules=["conv2"], use_effective_conv2d=True))
    delta = model.deltas("default")[0].double()
    assert delta.cp
    _perturb(model)
    x = inputs("conv", seed=4)["x"].double()

    def loss():
        return (model(x) ** 2).mean()

    loss().backward()
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, p in delta.named_parameters():
        v = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * v)
            up_ = loss()
            p.sub_(2 * eps * v)
            down = loss()
            p.add_(eps * v)
        numeric = (up_ - down) / (2 * eps)
        torch.testing.assert_close((p.grad * v).sum(), numeric, rtol=1e-6, atol=1e-9, msg=name)
