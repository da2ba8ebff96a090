"""add_weighted_adapter against PEFT's: the same LoRA adapters in PEFT and in unipeft.compat, every
combination type, identical merged tensors and outputs (fp32)."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from tests.interop import _models
from unipeft import compat
from unipeft.core.errors import ConfigError, MergeError

# Names PEFT accepts without its "prefix" warning (no substring of "lora_").
SOURCES = {"one": dict(r=4, lora_alpha=8), "two": dict(r=4, lora_alpha=3), "six": dict(r=2, lora_alpha=6)}
SAME_RANK = ["one", "two"]
ALL = ["one", "two", "six"]
TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd",
         "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _pair(kind: str, tmp_path):
    """(PEFT model, unipeft model, batch) holding the same seeded LoRA adapters ALL."""
    torch.manual_seed(0)
    base = MLP().eval() if kind == "mlp" else _models.build(kind)
    # GPT-2: transposed Conv1D weights and the token embedding; conv: a 3x3 Conv2d and a Linear.
    targets = {"mlp": ["fc1", "fc2"], "gpt2": ["c_attn", "c_proj", "wte"], "conv": ["conv2", "head"]}[kind]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    base_u = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = None
        for name, fields in SOURCES.items():
            cfg = peft.LoraConfig(target_modules=targets, **fields, **extra)
            if pm is None:
                pm = peft.get_peft_model(base, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path)
    um = compat.PeftModel.from_pretrained(base_u, str(tmp_path / "one"), adapter_name="one")
    for name in ALL[1:]:
        um.load_adapter(str(tmp_path / name), name)
    batch = {"x": torch.randn(5, 8, generator=g)} if kind == "mlp" else _models.inputs(kind)
    return pm.eval(), um.eval(), batch


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {kind: _pair(kind, tmp_path_factory.mktemp(kind)) for kind in ("mlp", "gpt2", "conv")}


def _run(model, batch, name):
    model.set_adapter(name)
    with torch.no_grad():
        return _models.output(model, batch)


def _reseeding(monkeypatch, obj, attr: str, seed: int) -> None:
    """Make obj.attr (the new adapter's injection) reset the global RNG to `seed` when it returns."""
    original = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        torch.manual_seed(seed)
        return out

    monkeypatch.setattr(obj, attr, wrapped)


def _both(models, kind, sources, weights, name, combination_type, seed=11, monkeypatch=None, **kw):
    pm, um, batch = models[kind]
    if monkeypatch is not None:  # the masks are drawn from `seed` whatever the injection drew before
        _reseeding(monkeypatch, pm.base_model, "inject_adapter", seed)
        _reseeding(monkeypatch, um, "add_adapter", seed)
    torch.manual_seed(seed)  # the same global RNG state: the dare types draw the same masks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(sources, weights, name, combination_type=combination_type, **kw)
    torch.manual_seed(seed)
    um.add_weighted_adapter(sources, weights, name, combination_type=combination_type, **kw)
    if monkeypatch is not None:
        monkeypatch.undo()
    return pm, um, batch


def _check(pm, um, batch, name):
    theirs = peft.get_peft_model_state_dict(pm, adapter_name=name)
    ours = um.adapter_state_dict(name)
    assert sorted(theirs) == sorted(ours) and theirs
    for key in theirs:
        assert torch.allclose(theirs[key], ours[key], atol=1e-5, rtol=0), (key, (theirs[key] - ours[key]).abs().max())
    pc, uc = pm.peft_config[name], um.peft_config[name]
    assert (uc.r, uc.alpha) == (pc.r, pc.lora_alpha)
    assert set(uc.target_modules) == set(pc.target_modules)
    assert torch.allclose(_run(pm, batch, name), _run(um, batch, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type", TYPES)
def test_every_combination_type_matches_peft(models, combination_type):
    factor = combination_type in ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
    sources = SAME_RANK if factor else ALL
    weights = [0.7, -0.4, 1.1][:len(sources)]
    kw = {} if combination_type in ("linear", "cat", "svd") else {"density": 0.5}
    if "ties" in combination_type:
        kw["majority_sign_method"] = "frequency" if combination_type.startswith("dare") else "total"
    name = f"m_{combination_type}"
    _check(*_both(models, "mlp", sources, weights, name, combination_type, **kw), name)


@pytest.mark.parametrize("combination_type,kw", [
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("svd", {"svd_rank": 5, "svd_full_matrices": False}),
    ("ties_svd", {"density": 0.3, "svd_rank": 6}),
])
def test_svd_options_match_peft(models, combination_type, kw):
    name = f"opt_{combination_type}_{kw['svd_rank']}"
    _check(*_both(models, "mlp", ALL, [1.0, 0.5, -0.8], name, combination_type, **kw), name)


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "dare_ties_svd"])
def test_other_layer_kinds_match_peft(models, kind, combination_type, monkeypatch):
    sources = SAME_RANK if combination_type == "linear" else ALL
    kw = {"density": 0.6} if combination_type.startswith("dare") else {}
    # PEFT's embedding init draws more from the RNG than ours, so the masks are compared from one state
    # reached after the injection on both sides (the draw order after it is what must agree).
    kw["monkeypatch"] = monkeypatch if kind == "gpt2" and "dare" in combination_type else None
    name = f"g_{combination_type}"
    _check(*_both(models, kind, sources, [0.9, -0.5, 0.6][:len(sources)], name, combination_type, **kw), name)


def test_one_source_is_linear_and_reproduces_the_scaled_adapter(models):
    pm, um, batch = _both(models, "mlp", ["two"], [1.0], "solo", "svd")
    _check(pm, um, batch, "solo")
    assert um.peft_config["solo"].r == 4  # linear: the source's rank, alpha = r
    assert torch.allclose(_run(um, batch, "solo"), _run(um, batch, "two"), atol=1e-5)


def test_dare_with_the_same_seed_is_identical_and_other_seeds_differ(models):
    pm, um, batch = _both(models, "mlp", SAME_RANK, [1.0, 1.0], "d1", "dare_linear", seed=5, density=0.5)
    _check(pm, um, batch, "d1")
    torch.manual_seed(6)
    um.add_weighted_adapter(SAME_RANK, [1.0, 1.0], "d2", combination_type="dare_linear", density=0.5)
    assert not torch.equal(um.adapter_state_dict("d1")[next(iter(um.adapter_state_dict("d1")))],
                           um.adapter_state_dict("d2")[next(iter(um.adapter_state_dict("d2")))])


def test_refusals_leave_the_model_unchanged(models):
    _, um, batch = models["mlp"]
    names = list(um.peft_config)
    with pytest.raises(MergeError, match="one rank"):
        um.add_weighted_adapter(ALL, [1.0, 1.0, 1.0], "bad1", combination_type="linear")
    with pytest.raises(ConfigError, match="combination_type"):
        um.add_weighted_adapter(ALL, [1.0, 1.0, 1.0], "bad2", combination_type="average")
    with pytest.raises(ConfigError, match="density"):
        um.add_weighted_adapter(SAME_RANK, [1.0, 1.0], "bad3", combination_type="ties")
    with pytest.raises(ConfigError, match="nope"):
        um.add_weighted_adapter(["one", "nope"], [1.0, 1.0], "bad4")
    with pytest.warns(UserWarning, match="exists"):  # PEFT returns without a change for a taken name
        um.add_weighted_adapter(SAME_RANK, [1.0, 1.0], "one", combination_type="linear")
    assert list(um.peft_config) == names


def test_get_peft_model_returns_a_model_with_add_weighted_adapter():
    torch.manual_seed(0)
    model = compat.get_peft_model(MLP(), compat.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]), "one")
    assert isinstance(model, compat.PeftCompatModel)
    model.add_adapter("two", compat.LoraConfig(r=3, lora_alpha=3, target_modules=["fc1"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    model.add_weighted_adapter(["one", "two"], [0.5, 2.0], "both", combination_type="cat")
    dw = {n: model.delta_at(n, "fc1").delta_weight()["weight"] for n in ("one", "two", "both")}
    assert model.peft_config["both"].r == 5
    assert torch.allclose(dw["both"], 0.5 * dw["one"] + 2.0 * dw["two"], atol=1e-6)
