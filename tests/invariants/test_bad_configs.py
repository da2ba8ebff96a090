"""Bad configs raise specific errors (naming what is wrong) and leave the model untouched."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import unipeft as up

from .cases import (MODEL_KINDS, OVERRIDES, adapt_case, applicable, build_model, candidate_targets,
                    make_batch, make_config, module_types, parametrize_cases, run)


def _kind(case):
    kinds = [k for k in MODEL_KINDS if applicable(case, k)]
    assert kinds, f"{case.id} fits no toy model"
    return kinds[0]


def _assert_untouched(model, types, batch, out):
    assert module_types(model) == types, "a failed adapt() left modules behind"
    assert all(p.requires_grad for p in model.parameters()), "a failed adapt() left the base frozen"
    torch.testing.assert_close(run(model, batch), out, rtol=0, atol=0)


@parametrize_cases
def test_no_module_matched_raises_target_error(case):
    kind = _kind(case)
    model = build_model(kind)
    batch, types = make_batch(kind), module_types(model)
    out = run(model, batch)
    cfg = make_config(case, kind).replace(target_modules=["no_such_module"])
    with pytest.raises(up.TargetError, match="no_such_module.*matched no module"):
        up.adapt(model, cfg)
    _assert_untouched(model, types, batch, out)
    cfg = make_config(case, kind).replace(target_modules=r"no\.such\..*")
    with pytest.raises(up.TargetError, match="matched no module"):
        up.adapt(model, cfg)
    _assert_untouched(model, types, batch, out)


@parametrize_cases
def test_unsupported_layer_type_raises_target_error(case):
    """Every toy MLP has an `act` ReLU: no method adapts an activation."""
    model = build_model("mlp")
    assert isinstance(model.act, nn.ReLU) and not isinstance(model.act, case.spec.capabilities.layer_types)
    batch, types = make_batch("mlp"), module_types(model)
    out = run(model, batch)
    kind = "mlp" if applicable(case, "mlp") else _kind(case)
    cfg = make_config(case, kind).replace(target_modules=["act"], modules_to_save=None)
    with pytest.raises(up.TargetError, match=r"'act' is a ReLU"):
        up.adapt(model, cfg)
    _assert_untouched(model, types, batch, out)


@parametrize_cases
def test_add_adapter_failure_leaves_adapted_model_unchanged(case):
    kind = _kind(case)
    model = build_model(kind)
    batch = make_batch(kind)
    adapted = adapt_case(case, kind, model)
    types, out = module_types(adapted), run(adapted, batch)
    targets = list(candidate_targets(case, kind))
    # The supported targets plus one unsupported module: nothing may be injected.
    extra = {"mlp": "act", "conv": "act", "embgpt": "act", "llama": "act_fn"}.get(kind, "dropout")
    assert extra in {p.rsplit(".", 1)[-1] for p, _ in model.named_modules()}
    bad = make_config(case, kind).replace(target_modules=[*targets, extra], modules_to_save=None)
    with pytest.raises(up.TargetError):
        adapted.add_adapter("second", bad)
    assert sorted(adapted.peft_config) == ["default"]
    assert module_types(adapted) == types
    torch.testing.assert_close(run(adapted, batch), out, rtol=0, atol=0)


def test_unknown_method_raises_config_error():
    with pytest.raises(up.ConfigError, match="unknown method 'no_such_method'.*lora"):
        up.get_method("no_such_method")
    with pytest.raises(up.ConfigError, match="unknown peft_type 'NO_SUCH_TYPE'"):
        up.AdapterConfig.from_dict({"peft_type": "NO_SUCH_TYPE", "target_modules": ["fc1"]})

    @dataclasses.dataclass
    class Unregistered(up.AdapterConfig):
        method = "never_registered"

    model = build_model("mlp")
    with pytest.raises(up.ConfigError, match="never_registered"):
        up.adapt(model, Unregistered(target_modules=["fc1"]))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(up.ConfigError, match="AdapterConfig"):
        up.adapt(build_model("mlp"), {"target_modules": ["fc1"]})


RANK_FIELDS = ("r", "rank")


@pytest.mark.parametrize("value", [0, -1])
@parametrize_cases
def test_rank_not_positive_raises_config_error(case, value):
    fields = [f.name for f in dataclasses.fields(case.spec.config_cls) if f.name in RANK_FIELDS]
    if not fields:
        pytest.skip(f"{case.method} has no rank field")
    kind = _kind(case)
    cfg = make_config(case, kind)
    for name in fields:
        with pytest.raises(up.ConfigError, match=rf"\b{name}\b.*{value}"):
            cfg.replace(**{name: value})


def test_rank_pattern_not_positive_raises_config_error():
    with pytest.raises(up.ConfigError, match="rank_pattern"):
        up.LoraConfig(target_modules=["fc1"], rank_pattern={"fc1": 0})


def test_bad_target_modules_type_raises_config_error():
    with pytest.raises(up.ConfigError, match="target_modules"):
        up.LoraConfig(target_modules=3)
    with pytest.raises(up.ConfigError, match="layers_to_transform"):
        up.LoraConfig(target_modules=["fc1"], layers_to_transform=[-1])


def test_cases_fail_loudly_for_an_unconfigurable_method(monkeypatch):
    """A method registered later whose config needs a field the factory cannot guess fails, not skips."""
    from unipeft.core import registry

    from . import cases

    @dataclasses.dataclass
    class NeedsFieldConfig(up.AdapterConfig):
        peft_type = "NEEDS_FIELD_TEST"
        needed: int = dataclasses.field(default=None)

        def validate(self):
            super().validate()
            if self.needed is None:
                raise up.ConfigError("NeedsFieldConfig.needed is required")

    spec = registry.MethodSpec("needs_field_test", NeedsFieldConfig, up.Delta,
                               up.Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Linear,)))
    NeedsFieldConfig.method = "needs_field_test"
    monkeypatch.setitem(registry._METHODS, "needs_field_test", spec)
    assert "needs_field_test" in [c.method for c in cases.all_cases()]
    case = cases.Case("needs_field_test", "needs_field_test")
    with pytest.raises(pytest.fail.Exception, match="needs_field_test.*Add a case for it in OVERRIDES"):
        cases.make_config(case, "mlp")
    monkeypatch.setitem(OVERRIDES, "needs_field_test", lambda kind, targets: {"needed": 1})
    assert cases.make_config(case, "mlp").needed == 1
    assert cases.CASES == [c for c in cases.CASES if c.method != "needs_field_test"]
