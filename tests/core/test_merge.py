"""Merging: safe_merge refuses non-finite results without writing anything; refused merges."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core import registry

from ..invariants.cases import (CASES, adapt_case, adapter_params, applicable, base_params, build_model, make_batch,
                                perturb, run)


def _mlp_lora():
    model = build_model("mlp")
    adapted = up.adapt(model, up.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    perturb(adapted, "default", seed=1)
    return adapted


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_safe_merge_refuses_non_finite_without_touching_base_weights(bad):
    adapted = _mlp_lora()
    batch = make_batch("mlp")
    with torch.no_grad():
        adapted.base_model.fc2.deltas["default"].lora_B.weight[0, 0] = bad  # the second site: fc1 comes first
    out_bad = run(adapted, batch)
    weights = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    with pytest.raises(up.MergeError, match=r"'fc2'.*non-finite.*\['weight'\].*left unchanged"):
        adapted.merge(safe_merge=True)
    with pytest.raises(up.MergeError, match="non-finite"):
        adapted.merge_and_unload(safe_merge=True)
    for n, p in base_params(adapted).items():
        assert torch.equal(p, weights[n]), f"a refused safe merge wrote into {n}"
    assert adapted.merged_adapters == []
    assert sorted(s.path for s in adapted.sites()) == ["fc1", "fc2"], "merge_and_unload stripped the sites"
    torch.testing.assert_close(run(adapted, batch), out_bad, rtol=0, atol=0, equal_nan=True)
    # Repaired, the same adapter merges.
    with torch.no_grad():
        adapted.base_model.fc2.deltas["default"].lora_B.weight[0, 0] = 0.0
    adapted.merge(safe_merge=True)
    assert adapted.merged_adapters == ["default"]
    assert not torch.equal(adapted.base_model.fc1.base_layer.weight, weights["fc1.base_layer.weight"])


@pytest.mark.parametrize("case", [c for c in CASES if c.spec.capabilities.mergeable], ids=lambda c: c.id)
def test_safe_merge_refuses_non_finite_for_every_mergeable_method(case):
    kind = next(k for k in ("mlp", "bert", "conv") if applicable(case, k))
    adapted = adapt_case(case, kind, build_model(kind))
    perturb(adapted, "default", seed=1)
    params = adapter_params(adapted, "default")
    last = sorted(params)[-1]
    with torch.no_grad():
        params[last].view(-1)[0] = float("inf")
    weights = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    with pytest.raises(up.MergeError, match="non-finite"):
        adapted.merge(safe_merge=True)
    for n, p in base_params(adapted).items():
        assert torch.equal(p, weights[n]), f"a refused safe merge wrote into {n}"
    assert adapted.merged_adapters == []


def test_merging_modules_to_save_into_a_tied_head_raises():
    model = build_model("gpt2")
    adapted = up.adapt(model, up.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    perturb(adapted, "default", seed=1)
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.raises(up.MergeError, match=r"lm_head\.weight.*tied"):
        adapted.merge()
    assert torch.equal(model.transformer.wte.weight, wte)
    assert adapted.merged_adapters == [], "part of the adapter was merged before the refusal"


def test_delete_merged_adapter_raises():
    adapted = _mlp_lora()
    adapted.merge()
    with pytest.raises(up.MergeError, match="unmerge"):
        adapted.delete_adapter("default")
    adapted.unmerge()
    adapted.delete_adapter("default")
    assert list(adapted.sites()) == []


def test_merge_unknown_adapter_raises_config_error():
    adapted = _mlp_lora()
    with pytest.raises(up.ConfigError, match="no adapter named 'nope'"):
        adapted.merge(["nope"])


@dataclasses.dataclass
class _ScaleConfig(up.AdapterConfig):
    peft_type = "TEST_SCALE"


class _ScaleDelta(up.Delta):
    """Output scaling with no weight-space form and no mixed-batch support."""

    def __init__(self, base, config, path, bank=None):
        super().__init__(base, config, path, bank)
        self.s = nn.Parameter(torch.full((base.out_features,), 2.0))

    def forward(self, x, base_out):
        return base_out * self.s


def test_non_mergeable_and_non_mixed_batch_methods_are_refused(monkeypatch):
    _ScaleConfig.method = "test_scale"
    spec = registry.MethodSpec("test_scale", _ScaleConfig, _ScaleDelta,
                               up.Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Linear,)))
    monkeypatch.setitem(registry._METHODS, "test_scale", spec)
    model = build_model("mlp")
    batch = make_batch("mlp")
    adapted = up.adapt(model, _ScaleConfig(target_modules=["fc2"]))
    out = run(adapted, batch)
    weights = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    with pytest.raises(up.MergeError, match="test_scale, which cannot be merged"):
        adapted.merge()
    with pytest.raises(up.MergeError, match="cannot be merged"):
        adapted.merge_and_unload()
    for n, p in base_params(adapted).items():
        assert torch.equal(p, weights[n])
    with pytest.raises(up.ConfigError, match="does not support mixed batches"):
        run(adapted, batch, adapter_names=["default"] * 5)
    torch.testing.assert_close(run(adapted, batch), out, rtol=0, atol=0)
    # Not mergeable, but unload still gives the base back.
    base = adapted.unload()
    assert isinstance(base.fc2, nn.Linear)
