"""XLoraConfig (PEFT's X-LoRA fields) and the reading of its LoRA expert folders.

The experts are LoRA adapter folders (`adapters`: {name: folder}), read by unipeft's own loader
(core/state.py), so any LoRA folder unipeft loads (PEFT's or ours) can be an expert. X-LoRA sits
exactly where its experts do: `target_modules` defaults to every module an expert adapts, read from
the experts' files (key names only) when the config is made.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ...core.config import CONFIG_NAME, AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import fraction, positive_int, positive_number

EXPERT_METHOD = "lora"
PREFIX = "base_model.model."


def expert_weights_file(name: str, folder: str) -> Path:
    """The safetensors file of expert `name`; ConfigError naming the expert when the folder is not a LoRA folder."""
    path = Path(folder)
    weights = path / "adapter_model.safetensors"
    if not (path / CONFIG_NAME).is_file() or not weights.is_file():
        raise ConfigError(f"XLoraConfig.adapters[{name!r}]: expected a LoRA adapter folder with {CONFIG_NAME} and "
                          f"adapter_model.safetensors, got {folder!r}")
    peft_type = json.loads((path / CONFIG_NAME).read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"XLoraConfig.adapters[{name!r}]: the experts must be LoRA adapters, {folder!r} holds "
                          f"peft_type {peft_type!r}")
    return weights


def expert_paths(adapters: dict[str, str]) -> list[str]:
    """Every module path that some expert adapts (from the files' key names, no tensor is read), sorted."""
    paths: set[str] = set()
    for name, folder in adapters.items():
        with safe_open(str(expert_weights_file(name, folder)), framework="pt") as f:
            for key in f.keys():
                if ".lora_" not in key or not key.startswith(PREFIX):
                    raise ConfigError(f"XLoraConfig.adapters[{name!r}]: '{key}' in {folder!r} is not a LoRA weight "
                                      f"of a module (experts hold lora_A / lora_B tensors only)")
                paths.add(key[len(PREFIX):].rsplit(".lora_", 1)[0])
    return sorted(paths)


def _is_expert_map(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(p, str) for k, p in v.items())


@dataclass
class XLoraConfig(AdapterConfig):
    """X-LoRA (Buehler & Buehler 2024): a classifier over the last hidden state of a first pass picks
    per-token weights of the frozen LoRA experts in `adapters` for the second pass.

    PEFT's fields and defaults; `hidden_size` None: the model's `config.hidden_size`."""

    peft_type = "XLORA"
    peft_class = "XLoraConfig"
    not_in_peft = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")

    hidden_size: int | None = positive_int(None, optional=True)
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = positive_int(1)
    xlora_size: int = positive_int(2048)
    xlora_dropout_p: float = fraction(0.2, "0 <= xlora_dropout_p < 1")
    use_trainable_adapters: bool = False
    softmax_temperature: float = positive_number(1.0)
    top_k_lora: int | None = positive_int(None, optional=True)
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        if not _is_expert_map(self.adapters):
            raise ConfigError(f"XLoraConfig.adapters: expected a non-empty {{expert name: LoRA folder}} dict, "
                              f"got {self.adapters!r}")
        if self.target_modules is None:
            self.target_modules = expert_paths(self.adapters)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"XLoraConfig.{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("scaling_pass_value", "global_scaling_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"XLoraConfig.{name}: expected a number, got {value!r}")
        if self.use_trainable_adapters:
            raise ConfigError("XLoraConfig.use_trainable_adapters=True: unipeft keeps the LoRA experts frozen (only "
                              "the classifier trains and is saved); train the experts as LoRA adapters instead")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ConfigError("XLoraConfig.enable_softmax_topk=True needs top_k_lora (the softmax runs over the "
                              "top-k experts), got top_k_lora=None")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """The classifier's input width, from the model when not given."""
        if self.hidden_size is not None:
            return {}
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(width, int):
            raise ConfigError("XLoraConfig.hidden_size: the model has no config.hidden_size; give the width of its "
                              "last hidden state")
        return {"hidden_size": width}

    def make_bank(self, model, targets):
        """The classifier, holding the experts' LoRA deltas (built from their folders) for the sites to take."""
        from .classifier import XLoraClassifier
        return XLoraClassifier.build(self, model, targets)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's keys; target_modules only when narrower than the experts' modules (PEFT has no such key)."""
        out = super().to_dict()
        try:
            derived = expert_paths(self.adapters)
        except ConfigError:  # an expert folder moved since: keep the sites written out
            derived = None
        if out.get("target_modules") is not None and list(out["target_modules"]) == derived:
            del out["target_modules"]
        return out
