"""Invariants of one adapter: coverage, identity at init, training touches only the adapter, disabling."""
from __future__ import annotations

import pytest
import torch

import unipeft as up

from .cases import (CASES, MODEL_KINDS, NOT_GENERIC, adapt_case, adapter_params, applicable, base_params,
                    build_model, differs, make_batch, parametrize_cases, parametrize_kinds, perturb, run)


@parametrize_cases
def test_every_case_is_exercised_on_some_model(case):
    kinds = [k for k in MODEL_KINDS if applicable(case, k)]
    assert kinds, (f"{case.id}: its layer types {case.spec.capabilities.layer_types} match no toy model; add a "
                   f"toy model to tests/invariants/cases.py that it can adapt")


def test_every_public_method_has_a_case():
    """Every public method is a case, but those NOT_GENERIC names (with where they are tested instead)."""
    assert set(NOT_GENERIC) <= set(up.public_methods())
    assert {c.method for c in CASES} >= set(up.public_methods()) - set(NOT_GENERIC)


@parametrize_cases
@parametrize_kinds
def test_identity_at_init(case, kind):
    if not case.spec.delta_cls.identity_at_init:
        pytest.skip(f"{case.method} is declared not to be the identity at init")
    model = build_model(kind)
    batch = make_batch(kind)
    expected = run(model, batch)
    adapted = adapt_case(case, kind, model)
    assert adapter_params(adapted, "default"), "the adapter has no parameters"
    if not all(d.identity_at_init for d in adapted.deltas("default")):
        pytest.skip(f"{case.id}: its deltas declare they change the output at init (KaSA truncates the base)")
    # Exactly the base output: an untrained adapter must not change anything. An init that leaves a
    # residual in the base (PiSSA: W - sBA, plus sBA in the adapter) reproduces W up to float rounding.
    tol = 1e-5 if any(s.edits for s in adapted.sites()) else 0.0
    torch.testing.assert_close(run(adapted, batch), expected, rtol=tol, atol=tol)


@parametrize_cases
@parametrize_kinds
def test_training_changes_only_active_adapter_parameters(case, kind):
    model = build_model(kind)
    batch = make_batch(kind)
    base_out = run(model, batch)
    adapted = adapt_case(case, kind, model)
    adapt_case(case, kind, model, "idle", into=adapted)  # inactive: must not train
    adapted.set_adapter("default")
    before_base = {n: p.detach().clone() for n, p in base_params(adapted).items()}
    before_idle = {n: p.detach().clone() for n, p in adapter_params(adapted, "idle").items()}
    before_default = {n: p.detach().clone() for n, p in adapter_params(adapted, "default").items()}
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_params(adapted, "default").values()}

    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        out = adapted(**batch)
        out = out.logits if hasattr(out, "logits") else out
        loss = (out - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for n, p in base_params(adapted).items():
        assert torch.equal(p, before_base[n]), f"base parameter {n} changed"
        assert p.grad is None, f"base parameter {n} received a gradient"
    for n, p in adapter_params(adapted, "idle").items():
        assert torch.equal(p, before_idle[n]), f"inactive adapter parameter {n} changed"
    changed = [n for n, p in adapter_params(adapted, "default").items() if not torch.equal(p, before_default[n])]
    assert changed, "no adapter parameter changed after three optimizer steps"
    assert differs(run(adapted, batch), base_out), "training did not change the output"


@parametrize_cases
@parametrize_kinds
def test_disabled_equals_base(case, kind):
    model = build_model(kind)
    batch = make_batch(kind)
    expected = run(model, batch)
    adapted = adapt_case(case, kind, model)
    perturb(adapted, "default", seed=1)
    assert differs(run(adapted, batch), expected), "the perturbed adapter does not change the output"
    with adapted.disable_adapters():
        torch.testing.assert_close(run(adapted, batch), expected, rtol=0, atol=0)
    assert differs(run(adapted, batch), expected), "the adapter stayed disabled after the context"


@parametrize_cases
@parametrize_kinds
def test_disabled_while_merged_equals_base(case, kind):
    if not case.spec.capabilities.mergeable:
        pytest.skip(f"{case.method} is not mergeable")
    model = build_model(kind)
    batch = make_batch(kind)
    expected = run(model, batch)
    adapted = adapt_case(case, kind, model)
    perturb(adapted, "default", seed=1)
    adapted_out = run(adapted, batch)
    adapted.merge()
    with adapted.disable_adapters():
        torch.testing.assert_close(run(adapted, batch), expected, rtol=1e-5, atol=1e-5)
    assert adapted.merged_adapters == ["default"], "the merge was not restored after the context"
    torch.testing.assert_close(run(adapted, batch), adapted_out, rtol=1e-5, atol=1e-5)


@parametrize_cases
@parametrize_kinds
def test_requires_grad_only_on_active_adapters(case, kind):
    model = build_model(kind)
    adapted = adapt_case(case, kind, model, "a")
    adapt_case(case, kind, model, "b", into=adapted)

    def grad_ids():
        return {id(p) for p in adapted.parameters() if p.requires_grad}

    ids = {name: {id(p) for p in adapter_params(adapted, name).values()} for name in ("a", "b")}
    assert ids["a"] and ids["b"] and not ids["a"] & ids["b"]
    assert grad_ids() == ids["a"]
    adapted.set_adapter("b")
    assert grad_ids() == ids["b"]
    adapted.set_adapter(["a", "b"])
    assert grad_ids() == ids["a"] | ids["b"]
    assert not any(p.requires_grad for p in base_params(adapted).values())
