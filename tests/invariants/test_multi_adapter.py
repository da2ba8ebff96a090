"""Several adapters: switching, disjoint targets, several active at once, mixed batches."""
from __future__ import annotations

import pytest
import torch

import unipeft as up

from .cases import (HEADS, adapt_case, adapter_params, build_model, candidate_targets, differs, make_batch,
                    parametrize_cases, parametrize_kinds, perturb, run)

# Cases whose adapters compose additively/multiplicatively on one site, so that stacking two
# equals merging one and applying the other (full copies replace each other; DoRA renormalises).


def _two(case, kind, targets_a=None, targets_b=None):
    model = build_model(kind)
    batch = make_batch(kind)
    base_out = run(model, batch)
    adapted = adapt_case(case, kind, model, "a", targets=targets_a)
    adapt_case(case, kind, model, "b", targets=targets_b, into=adapted)
    perturb(adapted, "a", seed=1)
    perturb(adapted, "b", seed=2)
    return adapted, batch, base_out


def _halves(case, kind):
    targets = list(candidate_targets(case, kind))
    if len(targets) < 2:
        pytest.skip(f"{case.id} adapts a single module of the {kind} model; no disjoint split")
    return targets[::2], targets[1::2]


@parametrize_cases
@parametrize_kinds
def test_switching_adapters_changes_outputs(case, kind):
    adapted, batch, base_out = _two(case, kind)
    adapted.set_adapter("a")
    out_a = run(adapted, batch)
    adapted.set_adapter("b")
    out_b = run(adapted, batch)
    assert differs(out_a, out_b), "two different adapters give the same output"
    assert differs(out_a, base_out) and differs(out_b, base_out)
    adapted.set_adapter("a")
    torch.testing.assert_close(run(adapted, batch), out_a, rtol=0, atol=0)
    adapted.delete_adapter("b")
    torch.testing.assert_close(run(adapted, batch), out_a, rtol=0, atol=0)


@parametrize_cases
@parametrize_kinds
def test_adapters_on_disjoint_targets_do_not_interfere(case, kind):
    left, right = _halves(case, kind)
    batch = make_batch(kind)
    alone = adapt_case(case, kind, build_model(kind), "a", targets=left)
    perturb(alone, "a", seed=1)
    out_alone = run(alone, batch)

    adapted, _, base_out = _two(case, kind, left, right)
    head = HEADS.get(kind) if case.needs_head else None
    for site in adapted.sites():  # only the shared modules_to_save head holds both
        assert len(site.deltas) == 1 or site.path == head, f"{site.path} holds {list(site.deltas)}"
    params_a = {k: v.detach().clone() for k, v in adapter_params(adapted, "a").items()}
    adapted.set_adapter("a")
    torch.testing.assert_close(run(adapted, batch), out_alone, rtol=0, atol=0)
    adapted.set_adapter("b")
    out_b = run(adapted, batch)
    assert differs(out_b, out_alone)
    adapted.delete_adapter("b")
    adapted.set_adapter("a")
    torch.testing.assert_close(run(adapted, batch), out_alone, rtol=0, atol=0)
    for k, v in adapter_params(adapted, "a").items():
        assert torch.equal(v, params_a[k]), f"adapter b changed adapter a's {k}"


def _merged_reference(adapted, batch, first, second):
    """Output with `second` merged into the weights and `first` applied on top (both active, so the
    base holds both adapters' base-weight edits when their inits made some; a merged adapter's delta is
    in the weights, not applied again)."""
    adapted.set_adapter([first, second])
    adapted.merge([second])
    out = run(adapted, batch)
    adapted.unmerge()
    return out


@parametrize_cases
@parametrize_kinds
def test_several_active_adapters_on_disjoint_targets_apply_both(case, kind):
    if not case.spec.capabilities.mergeable:
        pytest.skip(f"{case.method} is not mergeable: no reference for 'both applied'")
    if case.needs_head:
        pytest.skip("both adapters hold a full copy of the same head, which replace each other")
    left, right = _halves(case, kind)
    adapted, batch, base_out = _two(case, kind, left, right)
    adapted.set_adapter(["a", "b"])
    assert adapted.active_adapters == ["a", "b"]
    both = run(adapted, batch)
    for first, second in (("a", "b"), ("b", "a")):
        torch.testing.assert_close(both, _merged_reference(adapted, batch, first, second), rtol=1e-5, atol=1e-5)
    adapted.set_adapter("a")
    assert differs(run(adapted, batch), both)


@parametrize_cases
@parametrize_kinds
def test_several_active_adapters_on_same_targets_apply_both(case, kind):
    if not case.spec.capabilities.mergeable:
        pytest.skip(f"{case.id}: stacking on one site has no order-free reference")
    adapted, batch, base_out = _two(case, kind)
    if not all(d.commutes for n in ("a", "b") for d in adapted.deltas(n)):
        pytest.skip(f"{case.id}: its deltas do not declare that stacking commutes")
    adapted.set_adapter(["a", "b"])
    both = run(adapted, batch)
    torch.testing.assert_close(both, _merged_reference(adapted, batch, "a", "b"), rtol=1e-5, atol=1e-5)
    adapted.set_adapter(["b", "a"])
    torch.testing.assert_close(run(adapted, batch), both, rtol=1e-5, atol=1e-5)
    for single in ("a", "b"):
        adapted.set_adapter(single)
        assert differs(run(adapted, batch), both)


@parametrize_cases
@parametrize_kinds
def test_mixed_batch_rows_equal_per_adapter_runs(case, kind):
    adapted, batch, base_out = _two(case, kind)
    rows = ["b", up.core.site.BASE_NAME, "a", "b", "a"]
    assert len(rows) == next(iter(batch.values())).shape[0]
    if not case.spec.capabilities.mixed_batch:
        with pytest.raises(up.ConfigError, match="mixed"):
            run(adapted, batch, adapter_names=rows)
        return
    if any(s.edits for s in adapted.sites()):  # rows share the base weights an init edited (PiSSA's residual)
        with pytest.raises(up.ConfigError, match="edits the base weights.*mixed per row"):
            run(adapted, batch, adapter_names=rows)
        return
    expected = {}
    for name in ("a", "b"):
        adapted.set_adapter(name)
        expected[name] = run(adapted, batch)
    expected[up.core.site.BASE_NAME] = base_out
    adapted.set_adapter("a")
    mixed = run(adapted, batch, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"row {i} ({name}): {m}")
    # The active adapter setting is untouched by a mixed call.
    torch.testing.assert_close(run(adapted, batch), expected["a"], rtol=0, atol=0)
    # Rows already grouped (no permutation) take the other code path.
    grouped = ["a", "a", "b", "b", up.core.site.BASE_NAME]
    mixed = run(adapted, batch, adapter_names=grouped)
    for i, name in enumerate(grouped):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"row {i} ({name}): {m}")


@parametrize_cases
def test_mixed_batch_refused_while_merged(case):
    if not (case.spec.capabilities.mixed_batch and case.spec.capabilities.mergeable):
        pytest.skip("needs a mergeable mixed-batch method")
    adapted, batch, _ = _two(case, "mlp" if not case.needs_head else "bert")
    adapted.merge(["a"])
    with pytest.raises(up.MergeError, match="unmerge"):
        run(adapted, batch, adapter_names=["a"] * 5)
