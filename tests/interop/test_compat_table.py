"""unipeft.compat's PEFT-named config factories come from one table (each config's `peft_class`)."""
from __future__ import annotations

import dataclasses

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
import pytest

import unipeft as up
from unipeft import compat

FACTORIES = compat.config_factories()


def test_every_peft_compatible_method_has_a_factory_under_peft_class_name():
    declared = {s.config_cls.peft_class for s in up.public_methods().values()
                if s.capabilities.peft_compatible and "peft_class" in vars(s.config_cls)}
    missing = [s.name for s in up.public_methods().values()
               if s.capabilities.peft_compatible and not s.config_cls.peft_class]
    assert not missing, f"peft_compatible methods without peft_class: {missing}"
    assert declared <= set(FACTORIES) and {"LoraConfig", "IA3Config", "PromptEncoderConfig"} <= set(FACTORIES)
    assert set(FACTORIES) <= set(compat.__all__)


def _required(name: str, tmp_path) -> dict:
    """Fields a config cannot be made without: PEFT accepts an X-LoRA config without experts (and warns), ours
    reads its expert folders when made, so it gets one saved LoRA folder."""
    if name != "XLoraConfig":
        return {}
    from torch import nn

    expert = up.adapt(nn.Sequential(nn.Linear(4, 4)), up.LoraConfig(r=1, target_modules=["0"]))
    expert.save_pretrained(tmp_path / "e0")
    return {"adapters": {"0": str(tmp_path / "e0")}, "hidden_size": 4}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_names_a_peft_class_and_every_written_key_is_a_peft_field(name, tmp_path):
    peft_cls = getattr(peft, name)  # PEFT really has a config class of that name
    peft_fields = {f.name for f in dataclasses.fields(peft_cls)}
    cls = next(s.config_cls for s in up.public_methods().values() if vars(s.config_cls).get("peft_class") == name)
    written = set(cls(**{**cls.example_fields(["x"]), **_required(name, tmp_path)}).to_dict())
    assert written - peft_fields == set(), f"{name}: keys PEFT's class lacks"
    made = FACTORIES[name](**_required(name, tmp_path))  # PEFT's defaults are valid on our side too
    peft_types = [t for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if c is peft_cls]
    assert isinstance(made, cls) and [made.peft_type] == [str(getattr(t, "value", t)) for t in peft_types]
