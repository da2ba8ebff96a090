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
from .methods.full_copy import LNTuningConfig as _LNTuning
from .methods.ia3 import IA3Config as _IA3
from .methods.lora import LoraConfig as _Lora
from .methods.lora import hotswap as _hotswap
from .methods.prefix import PrefixTuningConfig as _Prefix
from .methods.prompts import PromptTuningConfig as _Prompt
from .methods.prompts import PTuningConfig as _PTuning


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


def LoraConfig(**kwargs: Any) -> _Lora:  # noqa: N802 - mirrors PEFT's class name
    """PEFT's LoraConfig field names (lora_alpha, lora_dropout, init_lora_weights...) -> up.LoraConfig."""
    return _from_peft_kwargs(_Lora, kwargs)


def IA3Config(**kwargs: Any) -> _IA3:  # noqa: N802
    """PEFT's IA3Config fields -> up.IA3Config."""
    return _from_peft_kwargs(_IA3, kwargs)


def LNTuningConfig(**kwargs: Any) -> _LNTuning:  # noqa: N802
    """PEFT's LNTuningConfig fields -> up.LNTuningConfig."""
    return _from_peft_kwargs(_LNTuning, kwargs)


def PromptTuningConfig(**kwargs: Any) -> _Prompt:  # noqa: N802
    """PEFT's PromptTuningConfig fields (prompt_tuning_init, prompt_tuning_init_text...) -> up.PromptTuningConfig."""
    return _from_peft_kwargs(_Prompt, kwargs)


def PrefixTuningConfig(**kwargs: Any) -> _Prefix:  # noqa: N802
    """PEFT's PrefixTuningConfig fields -> up.PrefixTuningConfig."""
    return _from_peft_kwargs(_Prefix, kwargs)


def PromptEncoderConfig(**kwargs: Any) -> _PTuning:  # noqa: N802
    """PEFT's PromptEncoderConfig (P-tuning) fields -> up.PTuningConfig."""
    return _from_peft_kwargs(_PTuning, kwargs)


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Like peft.get_peft_model: adapt `model`, training the task's head too (SEQ_CLS)."""
    return AdaptedModel(model, apply_task_type(peft_config), adapter_name)


class PeftModel:
    """Namespace mirroring peft.PeftModel's constructors."""

    @staticmethod
    def from_pretrained(model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **_: Any) -> AdaptedModel:
        """Load a PEFT (or unipeft) adapter folder onto `model`."""
        return AdaptedModel.from_pretrained(model, model_id, adapter_name, is_trainable)


def prepare_model_for_compiled_hotswap(model: AdaptedModel, *, target_rank: int | None = None, **_: Any) -> None:
    """PEFT's name: up.prepare_hotswap for every LoRA adapter of `model` (before torch.compile)."""
    for name, config in list(model.peft_config.items()):
        if isinstance(config, _Lora):
            _hotswap.prepare_hotswap(model, target_rank, name)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, **_: Any) -> None:
    """PEFT's name: up.hotswap_adapter (a prepared model; the adapter folder must be local)."""
    _hotswap.hotswap_adapter(model, model_name_or_path, adapter_name)


__all__ = ["IA3Config", "LNTuningConfig", "LoraConfig", "PeftModel", "PrefixTuningConfig", "PromptEncoderConfig",
           "PromptTuningConfig", "TaskType", "get_peft_model", "hotswap_adapter", "prepare_model_for_compiled_hotswap"]
