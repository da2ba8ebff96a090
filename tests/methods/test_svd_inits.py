"""SVD-family LoRA inits (svd_inits.py) and variants (svd_variants.py): identity at init, exact undo,
save/load, merge, what trains, the regulariser gradients, the randomized SVD and the errors."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.methods.lora.svd_inits import nystrom_svd

from ..invariants.cases import build_model, make_batch, run

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_4", "olora", "milora", "nlora", "svfit", "sorsa", "loldu"]


def _adapt(init: str, seed: int = 3, **kw) -> up.AdaptedModel:
    torch.manual_seed(seed)  # the randomized inits (pissa_niter_K, nlora) draw from the global RNG
    return up.adapt(build_model("llama"), up.LoraConfig(r=2, alpha=4, init=init, target_modules=TARGETS, **kw))


def _perturb(model: up.AdaptedModel) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _kasa(seed: int = 3) -> up.AdaptedModel:
    torch.manual_seed(seed)
    return up.adapt(build_model("llama"), up.LoraConfig(r=2, alpha=4, target_modules=TARGETS, kasa_config={}))


@pytest.mark.parametrize("init", INITS)
def test_identity_at_init_exact_unload_merge_and_roundtrip(init, tmp_path):
    batch = make_batch("llama")
    base = build_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    expected = run(base, batch)
    model = _adapt(init)
    torch.testing.assert_close(run(model, batch), expected, **TOL)
    edited = [s.path for s in model.sites() if not torch.equal(s.base_layer.weight, original[s.path + ".weight"])]
    assert len(edited) == 6  # every target holds its residual

    residual = {s.path: s.base_layer.weight.clone() for s in model.sites()}
    _perturb(model)
    adapted = run(model, batch)
    assert (adapted - expected).abs().max() > 1e-3
    model.merge()
    torch.testing.assert_close(run(model, batch), adapted, **TOL)
    model.unmerge()

    model.save_pretrained(tmp_path)
    torch.manual_seed(3)  # loading runs the init again on the original base: same draws, same residual
    loaded = up.AdaptedModel.from_pretrained(build_model("llama"), tmp_path)
    torch.testing.assert_close(run(loaded, batch), adapted, **TOL)
    saved, again = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    if init in ("pissa_niter_4", "nlora"):  # same draws; BLAS may round the sketch's solve differently per call
        assert all(torch.allclose(residual[s.path], s.base_layer.weight, rtol=0, atol=1e-6) for s in loaded.sites())
    else:
        assert all(torch.equal(residual[s.path], s.base_layer.weight) for s in loaded.sites())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init

    restored = model.unload().state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("init", ["pissa", "svfit", "loldu", "sorsa"])
def test_only_adapter_parameters_train(init):
    model = _adapt(init)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"pissa": {"lora_A.weight", "lora_B.weight"}, "sorsa": {"lora_A.weight", "lora_B.weight", "lora_diag"},
                "svfit": {"lora_diag"}, "loldu": {"lora_diag", "loldu_scale"}}[init]
    assert {n.split(".default.")[1] for n in trainable} == expected and len(trainable) == 6 * len(expected)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run_out = model(**make_batch("llama")).logits
    run_out.pow(2).mean().backward()
    opt.step()
    after = model.state_dict()
    changed = {k.split(".default.")[-1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected  # frozen factors (buffers) and the base stay put


def _grads(model, adapter="default"):
    return {f"{d.path}.{n}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for d in model.deltas(adapter) for n, p in d.named_parameters()}


def test_sorsa_regulariser_gradient_matches_hand_computation():
    model = _adapt("sorsa", sorsa_gamma=0.5)
    _perturb(model)  # leave orthonormality, so the penalty is not 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = up.TrainingHooks(model, opt, max_steps=1)
    hooks.before_optimizer_step()  # no task gradient: only the regulariser's
    got = _grads(model)
    for d in model.deltas("default"):
        a, b = d.lora_A.weight.detach(), d.lora_B.weight.detach()
        eye = torch.eye(a.shape[0])
        torch.testing.assert_close(got[f"{d.path}.lora_A.weight"], 0.5 * 4 * (a @ a.t() - eye) @ a, **TOL)
        torch.testing.assert_close(got[f"{d.path}.lora_B.weight"], 0.5 * 4 * b @ (b.t() @ b - eye), **TOL)
        torch.testing.assert_close(got[f"{d.path}.lora_diag"], torch.zeros(2))
        assert got[f"{d.path}.lora_A.weight"].abs().max() > 1e-4


def test_kasa_regulariser_gradient_truncation_and_undo():
    base = build_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = _kasa()
    assert model.peft_config["default"].kasa_config == {"beta": 1e-4, "gamma": 1e-3}
    site = next(model.sites())
    w0 = original[site.path + ".weight"]
    s_orig = torch.linalg.svdvals(w0)
    s_now = torch.linalg.svdvals(site.base_layer.weight)
    torch.testing.assert_close(s_now[:-2], s_orig[:-2], **TOL)  # the two smallest triplets are gone
    assert s_now[-2:].abs().max() < 1e-5
    _perturb(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    up.TrainingHooks(model, opt, max_steps=1).before_optimizer_step()
    got = _grads(model)
    for d in model.deltas("default"):
        a, b, diag = d.lora_A.weight.detach(), d.lora_B.weight.detach(), d.lora_diag.detach()
        eye = torch.eye(2)
        ma, mb = a @ a.t() - eye, b.t() @ b - eye
        torch.testing.assert_close(got[f"{d.path}.lora_diag"], 1e-4 * 2 * diag, **TOL)
        torch.testing.assert_close(got[f"{d.path}.lora_A.weight"], 1e-3 * 2 * ma @ a / ma.norm(), **TOL)
        torch.testing.assert_close(got[f"{d.path}.lora_B.weight"], 1e-3 * 2 * b @ mb / mb.norm(), **TOL)
    batch = make_batch("llama")
    adapted = run(model, batch)
    model.merge()
    torch.testing.assert_close(run(model, batch), adapted, **TOL)
    model.unmerge()
    restored = model.unload().state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_randomized_svd_close_to_full_svd():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    w = u @ torch.diag(0.5 ** torch.arange(16.0)) @ v.t()  # decaying spectrum
    parts = {}
    for init in ("pissa", "pissa_niter_8", "nlora"):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(16, 24))
        with torch.no_grad():
            net[0].weight.copy_(w)
        m = up.adapt(net, up.LoraConfig(r=3, alpha=6, init=init, target_modules=["0"]))
        d = m.deltas("default")[0]
        parts[init] = (d.lora_B.weight @ d.lora_A.weight * d.scaling).detach()
    full = parts["pissa"]
    assert (parts["pissa_niter_8"] - full).norm() / full.norm() < 1e-4
    # Nystrom with a 2r / 4r sketch: close, within what the tail (0.5^r decay) allows, and far from random.
    assert (parts["nlora"] - full).norm() / full.norm() < 0.2
    _, ss, _ = nystrom_svd(w, 3)
    torch.testing.assert_close(ss, torch.tensor([1.0, 0.5, 0.25]), atol=0.05, rtol=0.05)


def test_rank_too_large_and_unknown_init_leave_the_model_unchanged():
    model = build_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(up.ConfigError, match=r"LoraConfig\.r: init='pissa' needs a rank <= 16.*q_proj"):
        up.adapt(model, up.LoraConfig(r=17, init="pissa", target_modules=["q_proj"]))
    with pytest.raises(up.ConfigError, match=r"rank_pattern\['layers.1.self_attn.v_proj'\].*v_proj.*got 9"):
        up.adapt(model, up.LoraConfig(r=2, init="olora", target_modules=["q_proj", "v_proj"],
                                      rank_pattern={"layers.1.self_attn.v_proj": 9}))
    with pytest.raises(up.ConfigError, match=r"LoraConfig.r.*KaSA.*r < 8"):
        up.adapt(model, up.LoraConfig(r=8, kasa_config={}, target_modules=["v_proj"]))
    with pytest.raises(up.ConfigError, match=r"pissa_niter_<int>.*got 'pisa'"):
        up.LoraConfig(init="pisa")
    with pytest.raises(up.ConfigError, match="pissa_niter_<int>"):
        up.LoraConfig(init="pissa_niter_x")
    with pytest.raises(up.ConfigError, match="sorsa_gamma"):
        up.LoraConfig(init="pissa", sorsa_gamma=0.1)
    with pytest.raises(up.ConfigError, match="kasa_config"):
        up.LoraConfig(init="pissa", kasa_config={"beta": 0.1})
    with pytest.raises(up.TargetError, match="embed_tokens"):
        up.adapt(model, up.LoraConfig(r=2, init="pissa", target_modules=["q_proj", "embed_tokens"]))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_parametrised_init_name_round_trips(tmp_path):
    model = _adapt("pissa_niter_16")
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "pissa_niter_16"
    assert up.AdapterConfig.load(tmp_path).init == "pissa_niter_16"
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).init_lora_weights == "pissa_niter_16"


@pytest.mark.parametrize("init, extra", [("pissa", {}), ("olora", {"rank_pattern": {"v_proj": 3},
                                                                  "alpha_pattern": {"down_proj": 5}}),
                                         ("milora", {"use_rslora": True}), ("pissa_niter_2", {}), ("nlora", {})])
def test_save_as_plain_lora_loads_on_the_original_base(init, extra, tmp_path):
    batch = make_batch("llama")
    model = _adapt(init, **extra)
    _perturb(model)
    adapted = run(model, batch)
    up.save_as_plain_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 4
    ours = up.AdaptedModel.from_pretrained(build_model("llama"), tmp_path)
    torch.testing.assert_close(run(ours, batch), adapted, **TOL)
    pm = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(run(pm, batch), adapted, **TOL)
    torch.testing.assert_close(run(model, batch), adapted, **TOL)  # the model itself is unchanged


def test_save_as_plain_lora_refuses_non_plain_variants(tmp_path):
    with pytest.raises(up.ConfigError, match="svfit"):
        up.save_as_plain_lora(_adapt("svfit"), tmp_path)
