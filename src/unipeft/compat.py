"""PEFT-compatible entry points: a PEFT script runs on unipeft after changing only its imports.

    from unipeft.compat import LoraConfig, get_peft_model, PeftModel, TaskType
"""
from __future__ import annotations

import enum
from typing import Any

from torch import nn

from .core.config import AdapterConfig
from .core.model import AdaptedModel
from .interop.peft import apply_task_type
from .core.registry import public_methods
from .methods.lora import LoraConfig as _Lora
from .methods.lora import hotswap as _hotswap


class TaskType(str, enum.Enum):
    """PEFT's task types (the values are what PEFT writes to adapter_config.json)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def _from_peft_kwargs(cls: type[AdapterConfig], kwargs: dict[str, Any]) -> AdapterConfig:
    # PEFT passes enums (TaskType, PromptTuningInit, ...) where its JSON holds their string values.
    kwargs = {k: v.value if isinstance(v, enum.Enum) else v for k, v in kwargs.items()}
    return cls.from_dict({**kwargs, "peft_type": cls.peft_type})


def _factory(cls: type[AdapterConfig]):
    """PEFT's `<cls.peft_class>(**kwargs)`: PEFT's field names and enum values -> our config class."""
    def make(**kwargs: Any) -> AdapterConfig:
        return _from_peft_kwargs(cls, kwargs)
    make.__name__ = make.__qualname__ = cls.peft_class
    make.__doc__ = f"PEFT's {cls.peft_class} fields -> up.{cls.__name__} (method '{cls.method}')."
    return make


def config_factories() -> dict[str, Any]:
    """{PEFT config class name: factory} for every registered method whose config declares `peft_class`
    itself (a subclass inheriting LoraConfig's name, e.g. a training strategy of LoRA, does not take it)."""
    return {spec.config_cls.peft_class: _factory(spec.config_cls) for spec in public_methods().values()
            if "peft_class" in vars(spec.config_cls) and spec.config_cls.peft_class}


globals().update(config_factories())


def __getattr__(name: str):
    """PEFT config names of methods registered after this module was imported."""
    factories = config_factories()
    if name in factories:
        return factories[name]
    raise AttributeError(f"module 'unipeft.compat' has no attribute {name!r}")


class PeftCompatModel(AdaptedModel):
    """The AdaptedModel that get_peft_model and PeftModel.from_pretrained return, with PEFT's
    LoraModel-level methods."""

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """PEFT's add_weighted_adapter for LoRA adapters (see unipeft.merge.peft_compat)."""
        from .merge.peft_compat import add_weighted_adapter
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Like peft.get_peft_model: adapt `model`, training the task's head too (SEQ_CLS)."""
    return PeftCompatModel(model, apply_task_type(peft_config), adapter_name)


class PeftModel:
    """Namespace mirroring peft.PeftModel's constructors."""

    @staticmethod
    def from_pretrained(model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **_: Any) -> AdaptedModel:
        """Load a PEFT (or unipeft) adapter folder onto `model`."""
        return PeftCompatModel.from_pretrained(model, model_id, adapter_name, is_trainable)


def prepare_model_for_compiled_hotswap(model: AdaptedModel, *, target_rank: int | None = None, **_: Any) -> None:
    """PEFT's name: up.prepare_hotswap for every LoRA adapter of `model` (before torch.compile)."""
    for name, config in list(model.peft_config.items()):
        if isinstance(config, _Lora):
            _hotswap.prepare_hotswap(model, target_rank, name)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, **_: Any) -> None:
    """PEFT's name: up.hotswap_adapter (a prepared model; the adapter folder must be local)."""
    _hotswap.hotswap_adapter(model, model_name_or_path, adapter_name)


__all__ = sorted(["PeftCompatModel", "PeftModel", "TaskType", "config_factories", "get_peft_model",
                  "hotswap_adapter", "prepare_model_for_compiled_hotswap", *config_factories()])
