"""CorDA, EVA and LoRA-GA: identity at init, their defining properties, errors, save/load and unload."""
from __future__ import annotations

import gc
import json

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.calibration import BASE_HOLDS_RESIDUAL, TargetStats, calibration_data, collect
from tests.invariants.cases import build_model, make_batch, run

TARGETS = ["query", "value", "intermediate.dense"]
QUERY = "bert.encoder.layer.0.attention.self.query"


def _batches(n=3, labels=False):
    out = [make_batch("bert", seed=s) for s in range(10, 10 + n)]
    for b in out:
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
        if labels:
            b["labels"] = torch.arange(b["input_ids"].shape[0]) % 3
    return out


def _inputs(model, path, batches):
    """Every input row the module at `path` of the plain `model` receives, (rows, in)."""
    rows = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
    handle.remove()
    return torch.cat(rows).double()


def _config(init, **kw):
    return up.LoraConfig(r=2, alpha=4, init=init, target_modules=TARGETS, **kw)


CASES = [("corda", {}, False), ("corda", {"corda_config": {"corda_method": "kpm"}}, False),
         ("eva", {}, False), ("eva", {"eva_config": {"whiten": True, "rho": 1.0}}, False),
         ("lora_ga", {}, True), ("lora_ga", {"lora_ga_config": {"direction": "ArBr", "scale": "weight_svd"}}, True)]


@pytest.mark.parametrize("init,extra,labels", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_output_equals_the_base_at_init_and_unload_restores_it_bit_for_bit(init, extra, labels):
    base = build_model("bert")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    batch = make_batch("bert")
    out = run(base, batch)
    model = up.adapt(base, _config(init, **extra), calibration=_batches(labels=labels))
    torch.testing.assert_close(run(model, batch), out, rtol=1e-5, atol=1e-6)
    merged_out = None
    model.merge()
    merged_out = run(model, batch)
    model.unmerge()
    torch.testing.assert_close(merged_out, out, rtol=1e-5, atol=1e-5)
    restored = model.unload()
    assert all(torch.equal(v, ref[k]) for k, v in restored.state_dict().items())


def test_corda_residual_plus_adapter_is_w_and_kpm_takes_the_smallest_components():
    base = build_model("bert")
    w = base.get_submodule(QUERY).weight.detach().clone()
    ipm = up.adapt(build_model("bert"), _config("corda"), calibration=_batches())
    kpm = up.adapt(base, _config("corda", corda_config={"corda_method": "kpm"}), calibration=_batches())
    for model in (ipm, kpm):
        d = model.delta_at("default", QUERY)
        residual = model.base_model.get_submodule(QUERY).base_layer.weight
        torch.testing.assert_close(residual + d.scaling * d.lora_weight(), w, rtol=1e-5, atol=1e-6)
    big = ipm.delta_at("default", QUERY).lora_weight().norm()
    small = kpm.delta_at("default", QUERY).lora_weight().norm()
    assert big > 3 * small  # principal vs. minor components of W C
    assert kpm.peft_config["default"].corda_config["corda_method"] == "kpm"


def test_eva_rows_span_the_top_principal_directions_and_b_is_zero():
    base = build_model("bert")
    batches = _batches()
    x = _inputs(base, QUERY, batches)
    cov = torch.cov(x.T)
    top = torch.linalg.eigh(cov)[1].flip(1)[:, :2]  # (in, 2)
    model = up.adapt(base, _config("eva", eva_config={"rho": 1.0}), calibration=batches)
    d = model.delta_at("default", QUERY)
    a = d.lora_A.weight.double()
    torch.testing.assert_close(a.T @ a, top @ top.T, rtol=1e-4, atol=1e-5)  # same subspace, orthonormal rows
    assert torch.count_nonzero(d.lora_B.weight) == 0


class TwoInputs(nn.Module):
    """p reads x (variance in one direction), q reads y (isotropic): EVA should move rank from p to q."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.q = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x, y):
        return self.p(x) + self.q(y)


def _two_input_batches(n=4, strong=1):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=g) * torch.tensor([10.0] * strong + [0.3] * (8 - strong))
        out.append({"x": x, "y": torch.randn(32, 8, generator=g)})
    return out


def test_eva_rank_redistribution_sums_to_the_budget_and_is_saved(tmp_path):
    batches = _two_input_batches()
    config = up.LoraConfig(r=2, alpha=4, init="eva", target_modules=["p", "q"], eva_config={"rho": 2.0})
    model = up.adapt(TwoInputs(), config, calibration=batches)
    cfg = model.peft_config["default"]
    ranks = {d.path: d.r for d in model.deltas("default")}
    assert ranks == {"p": 1, "q": 3}  # budget 2 + 2; p's variance sits in one direction
    assert cfg.rank_pattern == {"p": 1, "q": 3} and cfg.alpha_pattern == {"p": 2.0, "q": 6.0}  # alpha * new / r
    assert config.rank_pattern == {}  # the user's config is never written
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"p": 1, "q": 3} and saved["alpha_pattern"] == {"p": 2.0, "q": 6.0}
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0
    with calibration_data(BASE_HOLDS_RESIDUAL):  # EVA leaves the base as it is
        loaded = up.AdaptedModel.from_pretrained(TwoInputs(), tmp_path)
    assert {d.path: d.r for d in loaded.deltas("default")} == ranks
    b = batches[0]
    torch.testing.assert_close(loaded(**b), model(**b), rtol=0, atol=0)
    # with rho = 1 no layer may grow, so nothing moves
    same = up.adapt(TwoInputs(), config.replace(eva_config={"rho": 1.0}), calibration=batches)
    assert {d.path: d.r for d in same.deltas("default")} == {"p": 2, "q": 2}


def test_eva_layer_given_rank_zero_gets_no_adapter():
    config = up.LoraConfig(r=1, alpha=1, init="eva", target_modules=["p", "q"], eva_config={"rho": 2.0})
    model = up.adapt(TwoInputs(), config, calibration=_two_input_batches(strong=2))
    assert [d.path for d in model.deltas("default")] == ["p"]  # x's two strong directions beat all of y's
    cfg = model.peft_config["default"]
    assert cfg.target_modules == ["p"] and cfg.rank_pattern == {"p": 2}
    assert isinstance(model.base_model.q, nn.Linear)


def test_lora_ga_a_and_b_come_from_the_gradient_and_the_base_is_offset():
    base = build_model("bert")
    batches = _batches(n=2, labels=True)
    ref = build_model("bert")
    g = sum(torch.autograd.grad(ref(**b).loss, [ref.get_submodule(QUERY).weight])[0] for b in batches) / 2
    u, s, vh = torch.linalg.svd(g.double())
    w = base.get_submodule(QUERY).weight.detach().clone()
    model = up.adapt(base, _config("lora_ga"), calibration=batches)
    d = model.delta_at("default", QUERY)
    a, b = d.lora_A.weight.double(), d.lora_B.weight.double()
    torch.testing.assert_close(a.T @ a, vh[:2].T @ vh[:2], rtol=1e-4, atol=1e-5)  # A: top-r right vectors
    gamma = (16 ** 0.25) / 4  # stable scale: out^(1/4) / sqrt(16)
    torch.testing.assert_close(b.norm(dim=0), s[2:4] * gamma, rtol=1e-4, atol=1e-6)  # B: next r, scaled
    residual = model.base_model.get_submodule(QUERY).base_layer.weight
    torch.testing.assert_close(residual, w - d.scaling * d.lora_weight(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init,labels", [("corda", False), ("eva", False), ("lora_ga", True)])
def test_save_load_is_exact_with_the_same_calibration_data(init, labels, tmp_path):
    batches = _batches(labels=labels)
    model = up.adapt(build_model("bert"), _config(init), calibration=batches)
    with torch.no_grad():
        for d in model.deltas("default"):
            d.lora_B.weight.add_(0.05)
            d.lora_A.weight.add_(0.05)
    batch = make_batch("bert")
    out = run(model, batch)
    model.save_pretrained(tmp_path)
    with calibration_data(batches):  # the same data rebuilds the same base residual
        loaded = up.AdaptedModel.from_pretrained(build_model("bert"), tmp_path)
    torch.testing.assert_close(run(loaded, batch), out, rtol=0, atol=0)
    # onto a base that already holds the residual (as PEFT saves it): nothing is recomputed or edited
    with calibration_data(BASE_HOLDS_RESIDUAL):
        plain = up.AdaptedModel.from_pretrained(_residual(init, batches), tmp_path)
    torch.testing.assert_close(run(plain, batch), out, rtol=0, atol=0)


def _residual(init, batches):
    """A plain model whose weights are the residual base `init` leaves (what PEFT saves as its base)."""
    model = up.adapt(build_model("bert"), _config(init), calibration=batches)
    sd = {k: v.clone() for k, v in model.base_model.state_dict().items() if "lora_" not in k}
    plain = build_model("bert")
    names = {k.replace(".base_layer", ""): v for k, v in sd.items()}
    plain.load_state_dict({k: names[k] for k in plain.state_dict()})
    return plain


@pytest.mark.parametrize("init", ["corda", "eva", "lora_ga"])
def test_missing_calibration_is_one_config_error_naming_the_init_and_the_model_is_unchanged(init):
    base = build_model("bert")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(up.ConfigError, match=rf"init='{init}'.*calibration=.*`calibration: \{{batches: N\}}`"):
        up.adapt(base, _config(init))
    assert isinstance(base.get_submodule(QUERY), nn.Linear)
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())


def test_lora_ga_without_labels_says_to_include_them_and_rank_too_large_is_refused():
    base = build_model("bert")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(up.ConfigError, match="include labels"):
        up.adapt(base, _config("lora_ga"), calibration=_batches())
    with pytest.raises(up.ConfigError, match=r"2 x rank.*= 18 .*exceeds min\(in, out\) = 16"):
        up.adapt(base, up.LoraConfig(r=9, init="lora_ga", target_modules=["query"]), calibration=_batches(labels=True))
    with pytest.raises(up.ConfigError, match=r"the rank = 17 .*exceeds min\(in, out\) = 16"):
        up.adapt(base, up.LoraConfig(r=17, init="corda", target_modules=["query"]), calibration=_batches())
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters()) and not base.training


def test_sub_config_validation_and_peft_key_names():
    with pytest.raises(up.ConfigError, match=r"eva_config\['rho'\]: expected a number >= 1"):
        up.LoraConfig(init="eva", eva_config={"rho": 0.5})
    with pytest.raises(up.ConfigError, match="corda_method.*'ipm' or 'kpm'"):
        up.LoraConfig(init="corda", corda_config={"corda_method": "xyz"})
    with pytest.raises(up.ConfigError, match="only used with init='lora_ga'"):
        up.LoraConfig(lora_ga_config={"direction": "ArBr"})
    with pytest.raises(up.ConfigError, match="expected a dict with keys"):
        up.LoraConfig(init="lora_ga", lora_ga_config={"bogus": 1})
    cfg = up.LoraConfig(init="lora_ga", lora_ga_config={"direction": "ArBr"})
    data = cfg.to_dict()
    assert data["lora_ga_config"] == {"direction": "ArBr", "scale": "stable", "stable_gamma": 16}
    assert data["eva_config"] is None and data["corda_config"] is None
    assert up.LoraConfig.from_dict(data) == cfg


def _live_tensors() -> list[torch.Tensor]:
    gc.collect()
    return [o for o in gc.get_objects() if torch.is_tensor(o)]


@pytest.mark.parametrize("kind", ["activations", "gradients"])
def test_calibration_memory_does_not_grow_with_the_number_of_batches(kind):
    model = build_model("bert")
    targets = [(p, m) for p, m in model.named_modules() if p.endswith(("query", "value"))]

    def stream(n):  # a generator: batches exist one at a time
        for i in range(n):
            b = make_batch("bert", seed=100 + i, rows=16)
            if kind == "gradients":
                b["labels"] = torch.arange(16) % 3
            yield b

    collect(model, targets, stream(1), kind)  # warm-up: caches the model builds lazily are not ours
    sizes = []
    for n in (2, 20):
        before = _live_tensors()  # held: their ids cannot be reused by new tensors
        seen = {id(t) for t in before}
        stats = collect(model, targets, stream(n), kind)
        sizes.append(sum(t.numel() * t.element_size() for t in _live_tensors() if id(t) not in seen))
        del before
        assert all(isinstance(s, TargetStats) for s in stats.values())
        assert stats[targets[0][0]].calls == (n if kind == "activations" else 0)
        del stats
    assert sizes[0] == sizes[1] and sizes[0] > 0, sizes


def test_padded_positions_do_not_enter_the_statistics():
    model = build_model("bert")
    targets = [(p, m) for p, m in model.named_modules() if p.endswith("intermediate.dense")]
    ids = make_batch("bert", seed=5)["input_ids"]
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][0, 4:] = 0
    stats = collect(model, targets, [padded], "activations")[targets[0][0]]
    assert stats.rows == ids.numel() - 3
    rows = []
    h = targets[0][1].register_forward_pre_hook(lambda m, a: rows.append(a[0][padded["attention_mask"].bool()]))
    with torch.no_grad():
        model(**padded)
    h.remove()
    x = rows[0].float()
    torch.testing.assert_close(stats.gram(), x.T @ x, rtol=1e-5, atol=1e-5)
