"""Structured low-rank methods (GraLoRA, DeFT, Lily, PEANuT): the update against a direct computation from
the method's definition, identity at init, merge, save/load, mixed batches against one forward per
adapter, and the errors for configs or shapes that do not fit."""
from __future__ import annotations

import pytest
import torch

import unipeft as up
from tests.interop._models import build, inputs, output
from tests.interop._parity import perturb

QV = ["query", "value", "intermediate.dense"]  # 32x32 and 32->40 in the tiny BERT


def _sites(model, name: str = "default"):
    return [s for s in model.sites() if name in s.deltas]


def _mixed_matches_per_adapter(make_a, make_b, kind: str = "bert") -> None:
    """Rows routed to adapters 'a' / 'b' / none in one call equal each adapter's own full forward."""
    model = up.adapt(build(kind), make_a(), "a")
    model.add_adapter("b", make_b())
    model.set_adapter(["a", "b"])
    perturb(model, seed=3)
    batch = inputs(kind, seed=5)
    rows = ["b", "a", "__base__", "a"]
    with torch.no_grad():
        mixed = output(model, {**batch, "adapter_names": rows})
        expected = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            expected[name] = output(model, batch)
        with model.disable_adapters():
            expected["__base__"] = output(model, batch)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=1e-5, rtol=1e-5)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-4  # the rows really differ by adapter


def _merge_and_reload(config, kind: str, tmp_path, mergeable: bool = True) -> None:
    model = up.adapt(build(kind), config)
    perturb(model)
    batch = inputs(kind, seed=7)
    with torch.no_grad():
        before = output(model, batch)
        assert (before - output(build(kind), batch)).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(output(loaded, batch), before)
    if mergeable:
        with torch.no_grad():
            merged = output(model.merge_and_unload(), batch)
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)


# ---- GraLoRA ------------------------------------------------------------------------------
def _gralora_reference(delta) -> torch.Tensor:
    """The (out, in) update block by block: block (j, n) = A_n[:, chunk j] @ B_j[chunk n], then hybrid."""
    k, s = delta.k, delta.r // delta.k
    fi, fo = delta.in_features // k, delta.out_features // k
    w = torch.zeros(delta.out_features, delta.in_features)
    for j in range(k):
        for n in range(k):
            a = delta.gralora_A[n][:, j * s:(j + 1) * s]          # (in/k, s)
            b = delta.gralora_B[j][n * s:(n + 1) * s]             # (s, out/k)
            w[j * fo:(j + 1) * fo, n * fi:(n + 1) * fi] = (a @ b).T
    if delta.hybrid_r:
        w = w + delta.gralora_B_general.weight @ delta.gralora_A_general.weight
    return delta.scaling * w


@pytest.mark.parametrize("k,hybrid", [(2, 0), (4, 2), (1, 1)])
def test_gralora_update_is_the_block_structure_and_forward_uses_it(k, hybrid):
    torch.manual_seed(0)
    model = up.adapt(build("bert"), up.GraloraConfig(r=8, gralora_k=k, hybrid_r=hybrid, alpha=4, target_modules=QV))
    perturb(model)
    for site in _sites(model):
        d = site.deltas["default"]
        ref = _gralora_reference(d)
        torch.testing.assert_close(d.delta_weight()["weight"], ref, atol=1e-6, rtol=1e-5)
        x = torch.randn(3, 5, d.in_features)
        torch.testing.assert_close(d(x, torch.zeros(3, 5, d.out_features)), x @ ref.T, atol=1e-5, rtol=1e-5)
    if k > 1:  # the blocks reach a rank above r/k per block: the whole update has rank > r / k
        d = _sites(model)[0].deltas["default"]
        assert torch.linalg.matrix_rank(_gralora_reference(d)) > 8 // k


def test_gralora_identity_at_init_merge_and_round_trip(tmp_path):
    cfg = up.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=QV)
    model = up.adapt(build("bert"), cfg)
    batch = inputs("bert")
    with torch.no_grad():
        assert torch.equal(output(model, batch), output(build("bert"), batch))
    _merge_and_reload(cfg, "bert", tmp_path)


def test_gralora_mixed_batch_equals_one_forward_per_adapter():
    _mixed_matches_per_adapter(lambda: up.GraloraConfig(r=4, gralora_k=2, target_modules=QV),
                               lambda: up.GraloraConfig(r=4, gralora_k=4, hybrid_r=2, target_modules=["query"]))


def test_gralora_refuses_configs_and_shapes_that_do_not_fit():
    with pytest.raises(up.ConfigError, match=r"GraloraConfig.r: expected a multiple of gralora_k=3"):
        up.GraloraConfig(r=4, gralora_k=3)
    with pytest.raises(up.ConfigError, match=r"GraloraConfig.hybrid_r"):
        up.GraloraConfig(hybrid_r=-1)
    with pytest.raises(up.ConfigError, match=r"GraloraConfig.gralora_k: module 'classifier' has 3 output features"):
        up.adapt(build("bert"), up.GraloraConfig(r=4, gralora_k=2, target_modules=["classifier"]))


# ---- DeFT ---------------------------------------------------------------------------------
def _deft_reference(delta, base) -> torch.Tensor:
    """W' = (I - P_proj) W + Q_P (s R) with the out x out projector written out."""
    w = base.weight.detach().float()
    p = delta.deft_P.detach().float()
    q, right = (torch.linalg.qr(p)[0],) * 2 if delta.method == "qr" else (p, torch.relu(p))
    proj = q @ right.T
    new = (torch.eye(w.shape[0]) - proj) @ w
    if not delta.para:
        new = new + q @ (delta.deft_R.detach().float() * delta.scaling)
    return new


@pytest.mark.parametrize("fields", [{}, {"alpha": 6, "decomposition_method": "qr"}, {"para": True}])
def test_deft_merged_weight_is_the_residual_projection_update(fields):
    model = up.adapt(build("bert"), up.DeftConfig(r=4, target_modules=QV, **fields))
    perturb(model, scale=0.05)
    for site in _sites(model):
        d = site.deltas["default"]
        expected = _deft_reference(d, site.base_layer)
        torch.testing.assert_close(site.base_layer.weight + d.delta_weight()["weight"], expected,
                                   atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 3, expected.shape[1])
        base_out = site.base_layer(x)
        with torch.no_grad():
            torch.testing.assert_close(d(x, base_out), x @ expected.T + site.base_layer.bias, atol=1e-5, rtol=1e-5)
        if d.method == "qr":  # an orthogonal projector: P_proj^2 = P_proj
            q, _ = d.projection()
            torch.testing.assert_close((q @ q.T) @ (q @ q.T), q @ q.T, atol=1e-5, rtol=1e-5)


def test_deft_init_is_the_identity_and_para_is_not(tmp_path):
    batch = inputs("bert")
    with torch.no_grad():
        base = output(build("bert"), batch)
        exact = up.adapt(build("bert"), up.DeftConfig(r=4, target_modules=QV))
        assert torch.equal(output(exact, batch), base)  # no alpha: s R == right^T W bit for bit
        scaled = up.adapt(build("bert"), up.DeftConfig(r=4, alpha=3, target_modules=QV))
        torch.testing.assert_close(output(scaled, batch), base, atol=1e-6, rtol=1e-6)
        para = up.adapt(build("bert"), up.DeftConfig(r=4, para=True, target_modules=QV))
        assert (output(para, batch) - base).abs().max() > 1e-7
    assert not any(d.identity_at_init for d in para.deltas("default"))
    assert all(d.identity_at_init for d in exact.deltas("default"))
    assert {n for n, _ in para.named_parameters() if "deft_R" in n} == set()
    _merge_and_reload(up.DeftConfig(r=4, alpha=8, target_modules=QV), "bert", tmp_path)


def test_deft_rank_is_capped_at_out_features_and_unmerge_restores_the_base():
    model = up.adapt(build("bert"), up.DeftConfig(r=36, target_modules=QV))
    shapes = {s.path.rsplit(".", 2)[-2] + "." + s.path.rsplit(".", 1)[-1]: tuple(s.deltas["default"].deft_P.shape)
              for s in _sites(model)}
    assert shapes["self.query"] == (32, 32) and shapes["intermediate.dense"] == (40, 36)
    perturb(model, scale=0.05)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if k.endswith("base_layer.weight")}
    model.merge()
    assert any((model.base_model.state_dict()[k] - v).abs().max() > 1e-4 for k, v in before.items())
    model.unmerge()
    for k, v in before.items():
        torch.testing.assert_close(model.base_model.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_deft_mixed_batch_equals_one_forward_per_adapter():
    _mixed_matches_per_adapter(lambda: up.DeftConfig(r=4, target_modules=QV),
                               lambda: up.DeftConfig(r=2, para=True, decomposition_method="qr", target_modules=["value"]))


def test_deft_refuses_bad_fields():
    with pytest.raises(up.ConfigError, match=r"DeftConfig.decomposition_method: expected one of \['relu', 'qr'\]"):
        up.DeftConfig(decomposition_method="svd")
    with pytest.raises(up.ConfigError, match=r"DeftConfig.alpha: expected a number >= 0 or None"):
        up.DeftConfig(alpha=-1)
    for alpha in (None, 0):  # PEFT's rule: no alpha means no scaling
        model = up.adapt(build("bert"), up.DeftConfig(r=4, alpha=alpha, target_modules=["query"]))
        assert all(d.scaling == 1.0 for d in model.deltas("default"))


# ---- Lily ---------------------------------------------------------------------------------
def test_lily_shares_A_per_stride_and_B_per_target_like_peft():
    import peft

    targets = ["query", "value", "intermediate.dense"]
    model = up.adapt(build("bert"), up.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=targets))
    deltas = {s.path: s.deltas["default"] for s in _sites(model)}
    by_name = {t: [d for p, d in deltas.items() if p.endswith(t)] for t in targets}
    for name, ds in by_name.items():
        assert len(ds) == 2
        assert ds[0].lily_A is ds[1].lily_A and ds[0].lily_B is ds[1].lily_B  # 2 layers, stride 2
        assert ds[0].lily_router is not ds[1].lily_router
    assert by_name["query"][0].lily_B is not by_name["value"][0].lily_B  # same shape, other target
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pm = peft.get_peft_model(build("bert"), peft.LilyConfig(r=4, stride_A=2, num_B=3, target_modules=targets))
    assert ours == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    stride1 = up.adapt(build("bert"), up.LilyConfig(r=4, stride_A=1, num_B=3, target_modules=["query"]))
    a0, a1 = (s.deltas["default"] for s in _sites(stride1))
    assert a0.lily_A is not a1.lily_A and a0.lily_B is a1.lily_B


def test_lily_forward_mixes_the_experts_by_the_batch_mean_router_weights():
    model = up.adapt(build("bert"), up.LilyConfig(r=4, num_B=3, scaling=0.7, target_modules=["query"]))
    perturb(model)
    d = _sites(model)[0].deltas["default"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x @ d.lily_A.weight.T
        p = torch.softmax(h @ d.lily_router.weight.T, -1).mean(dim=(0, 1))
        experts = d.lily_B.weight.view(3, 4, 32)
        expected = 0.7 * h @ sum(p[e] * experts[e] for e in range(3))
        torch.testing.assert_close(d(x, torch.zeros(2, 5, 32)), expected, atol=1e-6, rtol=1e-5)
        alone = d(x[:1], torch.zeros(1, 5, 32))
        assert (alone - expected[:1]).abs().max() > 1e-6  # the weights are averaged over the whole call


def test_lily_identity_round_trip_and_honest_capabilities(tmp_path):
    cfg = up.LilyConfig(r=4, stride_A=2, num_B=2, target_modules=QV)
    model = up.adapt(build("bert"), cfg)
    batch = inputs("bert")
    with torch.no_grad():
        assert torch.equal(output(model, batch), output(build("bert"), batch))
    _merge_and_reload(cfg, "bert", tmp_path, mergeable=False)
    with pytest.raises(up.MergeError, match="lily, which cannot be merged"):
        model.merge()
    model.add_adapter("other", up.LilyConfig(r=2, target_modules=["query"]))
    with pytest.raises(up.ConfigError, match="mixed"):
        output(model, {**batch, "adapter_names": ["default", "other", "default", "other"]})


def test_lily_shared_weights_train_once_for_all_their_sites():
    model = up.adapt(build("bert"), up.LilyConfig(r=4, stride_A=2, num_B=2, target_modules=["query"]))
    a, b = (s.deltas["default"] for s in _sites(model))
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p is a.lily_A.weight for p in params) == 1
    out = output(model, inputs("bert"))
    (out ** 2).mean().backward()
    assert a.lily_B.weight.grad is b.lily_B.weight.grad and a.lily_B.weight.grad.abs().max() > 0


def test_lily_refuses_bad_fields():
    with pytest.raises(up.ConfigError, match=r"LilyConfig.num_B: expected an integer >= 2"):
        up.LilyConfig(num_B=1)
    with pytest.raises(up.ConfigError, match=r"LilyConfig.stride_A: expected a positive integer"):
        up.LilyConfig(stride_A=0)


# ---- PEANuT -------------------------------------------------------------------------------
def _peanut_reference(delta, weight: torch.Tensor, act) -> torch.Tensor:
    """dW written out level by level from the definition (W^T rows through A, encoders, decoders, B)."""
    h = act(weight.T @ delta.peanut_A.weight.T)
    levels = []
    for enc in delta.peanut_encoders:
        levels.append(h)
        h = act(h @ enc.weight.T)
    for i, dec in enumerate(delta.peanut_decoders):
        h = act(h @ dec.weight.T) + levels[len(levels) - 1 - i]
    return delta.scaling * (h @ delta.peanut_B.weight.T).T


@pytest.mark.parametrize("depth,act", [(0, "relu"), (2, "gelu"), (3, "tanh")])
def test_peanut_update_is_the_network_of_the_base_weight(depth, act):
    model = up.adapt(build("bert"), up.PeanutConfig(r=4, depth=depth, act_fn=act, scaling=0.3, target_modules=QV))
    perturb(model, scale=0.1)
    fn = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[act]
    for site in _sites(model):
        d = site.deltas["default"]
        with torch.no_grad():
            ref = _peanut_reference(d, site.base_layer.weight, fn)
            torch.testing.assert_close(d.delta_weight()["weight"], ref, atol=1e-6, rtol=1e-5)
            x = torch.randn(2, 3, ref.shape[1])
            torch.testing.assert_close(d(x, site.base_layer(x)), site.base_layer(x) + x @ ref.T, atol=1e-5, rtol=1e-5)
            # weight-aware: the same adapter on another base weight gives another update
            before = d.delta_weight()["weight"].clone()
            site.base_layer.weight.mul_(2.0)
            assert (d.delta_weight()["weight"] - before).abs().max() > 1e-5
            site.base_layer.weight.mul_(0.5)


def test_peanut_identity_merge_unmerge_and_round_trip(tmp_path):
    cfg = up.PeanutConfig(r=4, depth=1, target_modules=QV)
    model = up.adapt(build("bert"), cfg)
    batch = inputs("bert")
    with torch.no_grad():
        assert torch.equal(output(model, batch), output(build("bert"), batch))
    _merge_and_reload(cfg, "bert", tmp_path)
    perturb(model)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if k.endswith("base_layer.weight")}
    model.merge()
    model.unmerge()
    for k, v in before.items():
        torch.testing.assert_close(model.base_model.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_peanut_mixed_batch_equals_one_forward_per_adapter():
    _mixed_matches_per_adapter(lambda: up.PeanutConfig(r=4, target_modules=QV),
                               lambda: up.PeanutConfig(r=2, depth=2, act_fn="gelu", target_modules=["value"]))


def test_peanut_refuses_bad_fields_and_layers():
    with pytest.raises(up.ConfigError, match=r"PeanutConfig.act_fn: expected an activation name"):
        up.PeanutConfig(act_fn="nonesuch")
    with pytest.raises(up.ConfigError, match=r"PeanutConfig.depth: expected an integer >= 0"):
        up.PeanutConfig(depth=-1)
    with pytest.raises(up.UnipeftError, match="Conv1D"):
        up.adapt(build("gpt2"), up.PeanutConfig(r=2, target_modules=["c_attn"]))
