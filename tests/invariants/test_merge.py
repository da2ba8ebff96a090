"""Merge invariants: merged == unmerged, unmerge restores the base, merge_and_unload, unload, tied weights."""
from __future__ import annotations

import pytest
import torch

import unipeft as up

from .cases import (CASES, adapt_case, base_params, build_model, calibration_batches, clone_state, differs, make_batch,
                    make_config, module_types, no_adapter_modules, parametrize_cases, parametrize_kinds,
                    perturb, run)


def _mergeable(case):
    if not case.spec.capabilities.mergeable:
        pytest.skip(f"{case.method} declares mergeable=False")


def _perturbed(case, kind):
    model = build_model(kind)
    batch = make_batch(kind)
    base_out = run(model, batch)
    types = module_types(model)
    state = clone_state(model)
    adapted = adapt_case(case, kind, model)
    perturb(adapted, "default", seed=1)
    out = run(adapted, batch)
    assert differs(out, base_out), "the perturbed adapter does not change the output"
    return adapted, batch, base_out, out, types, state


@parametrize_cases
@parametrize_kinds
def test_merged_equals_unmerged(case, kind):
    _mergeable(case)
    adapted, batch, base_out, out, _, _ = _perturbed(case, kind)
    adapted.merge()
    assert adapted.merged_adapters == ["default"]
    torch.testing.assert_close(run(adapted, batch), out, rtol=1e-5, atol=1e-5)


@parametrize_cases
@parametrize_kinds
def test_unmerge_restores_base_weights(case, kind):
    _mergeable(case)
    adapted, batch, base_out, out, _, state = _perturbed(case, kind)
    before = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    adapted.merge()
    changed = [n for n, p in base_params(adapted).items() if not torch.equal(p, before[n])]
    assert changed, "merge() changed no base weight"
    adapted.unmerge()
    assert adapted.merged_adapters == []
    for n, p in base_params(adapted).items():
        torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(run(adapted, batch), out, rtol=1e-5, atol=1e-5)
    # A second merge/unmerge round trip behaves the same (nothing cached stays behind).
    adapted.merge()
    torch.testing.assert_close(run(adapted, batch), out, rtol=1e-5, atol=1e-5)
    adapted.unmerge()
    for n, p in base_params(adapted).items():
        torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")


@parametrize_cases
@parametrize_kinds
def test_merge_and_unload_leaves_no_adapter_module(case, kind):
    _mergeable(case)
    adapted, batch, base_out, out, types, state = _perturbed(case, kind)
    base = adapted.merge_and_unload()
    assert no_adapter_modules(base)
    assert module_types(base) == types
    assert set(base.state_dict()) == set(state), "merge_and_unload changed the state dict keys"
    torch.testing.assert_close(run(base, batch), out, rtol=1e-5, atol=1e-5)
    assert differs(run(base, batch), base_out)


@parametrize_cases
@parametrize_kinds
def test_unload_equals_base(case, kind):
    adapted, batch, base_out, out, types, state = _perturbed(case, kind)
    base = adapted.unload()
    assert no_adapter_modules(base)
    assert module_types(base) == types
    torch.testing.assert_close(run(base, batch), base_out, rtol=0, atol=0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), f"unload() changed {k}"
    assert all(p.requires_grad for p in base.parameters()), "unload() did not restore requires_grad"


@parametrize_cases
@parametrize_kinds
def test_unload_after_merge_equals_base(case, kind):
    _mergeable(case)
    adapted, batch, base_out, out, types, state = _perturbed(case, kind)
    adapted.merge()
    base = adapted.unload()
    assert no_adapter_modules(base)
    torch.testing.assert_close(run(base, batch), base_out, rtol=1e-5, atol=1e-5)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("target", ["lm_head", "transformer.wte"])
@parametrize_cases
def test_merge_into_tied_weight_raises(case, target):
    """GPT-2 ties wte and lm_head: merging into one would change both, so it is refused."""
    _mergeable(case)
    model = build_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = make_batch("gpt2")
    cfg = make_config(case, "gpt2", targets=[target])
    try:
        adapted = up.adapt(model, cfg, calibration=calibration_batches(case, "gpt2"))
    except up.TargetError as exc:
        pytest.skip(f"{case.id} cannot adapt {target}: {exc}")
    perturb(adapted, "default", seed=1)
    out = run(adapted, batch)
    weights = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    with pytest.raises(up.MergeError, match="tied"):
        adapted.merge()
    with pytest.raises(up.MergeError, match="tied"):
        adapted.merge_and_unload()
    assert adapted.merged_adapters == []
    for n, p in base_params(adapted).items():
        assert torch.equal(p, weights[n]), f"a refused merge changed {n}"
    torch.testing.assert_close(run(adapted, batch), out, rtol=0, atol=0)


def test_tied_weight_case_covers_some_method():
    assert any(c.spec.capabilities.mergeable and "Linear" in {t.__name__ for t in c.spec.capabilities.layer_types}
               for c in CASES)
