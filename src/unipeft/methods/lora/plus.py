"""LoRA+ (Hayou et al. 2024): LoRA whose B matrices learn `loraplus_lr_ratio` times faster than A.

A training strategy, not a different adapter: the deltas are plain LoRA deltas and the saved
folder is a PEFT "LORA" folder. The strategy is two optimizer parameter groups
(`LoraPlusConfig.optimizer_groups`), which the trainer adds after the user's groups:

  * B's group at `lr * loraplus_lr_ratio`: every `lora_B` matrix of the adapter and its 1-D
    parameters (DoRA's magnitude vector), as PEFT's `create_loraplus_optimizer` groups them;
  * the LoRA pair of embedding layers at the absolute `loraplus_lr_embedding` (PEFT's 1e-6);
  * everything else (the A matrices) at the optimizer's lr.

Plain PyTorch loops get the same groups from `create_loraplus_optimizer(model, lr=...)`.
The two fields are written into adapter_config.json so the adapter reloads as "loraplus" (PEFT
0.21 drops keys its LoraConfig lacks, with a warning, and loads the LoRA weights unchanged).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.fields import positive_number
from ...core.hooks import method_param_groups
from ...core.registry import Capabilities, register
from .config import LoraConfig
from .deltas import LAYERS, LoraDelta


def loraplus_groups(adapter_name: str, ratio: float, lr_embedding: float) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of adapter `adapter_name` (regexes on the model's parameter names)."""
    root = rf"\.deltas\.{re.escape(adapter_name)}\.(?:.*\.)?"
    return [{"params": root + r"lora_embedding_[AB]\b", "lr": float(lr_embedding)},
            {"params": root + r"(?:lora_B|lora_magnitude_vector)\b", "lr_scale": float(ratio)}]


@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA+: LoRA trained with B's learning rate `loraplus_lr_ratio` x the optimizer's (A's) lr."""

    loraplus_lr_ratio: float = positive_number(16.0)
    loraplus_lr_embedding: float = positive_number(1e-6)

    def optimizer_groups(self, adapter_name: str) -> list[dict[str, Any]]:
        """B (and 1-D LoRA parameters) at ratio x lr; embedding LoRA at `loraplus_lr_embedding`."""
        return loraplus_groups(adapter_name, self.loraplus_lr_ratio, self.loraplus_lr_embedding)


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                              lr: float, loraplus_lr_ratio: float | None = None,
                              loraplus_lr_embedding: float | None = None, loraplus_weight_decay: float = 0.0,
                              **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters with LoRA+'s groups, for plain training loops.

    Each LoraPlusConfig adapter uses its own ratio and embedding lr; `loraplus_lr_ratio` /
    `loraplus_lr_embedding` override them and, when given, also apply to plain LoRA-family
    adapters (PEFT's helper takes the ratio as an argument). `loraplus_weight_decay` applies to
    every group (PEFT's default 0.0); `kwargs` go to `optimizer_cls`."""
    from ...core.errors import ConfigError
    from ...core.model import AdaptedModel

    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio),
                        ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"create_loraplus_optimizer.{name}: expected a positive number, got {value!r}")
    if isinstance(loraplus_weight_decay, bool) or not isinstance(loraplus_weight_decay, (int, float)) \
            or loraplus_weight_decay < 0:
        raise ConfigError(f"create_loraplus_optimizer.loraplus_weight_decay: expected a number >= 0, "
                          f"got {loraplus_weight_decay!r}")
    specs: list[dict[str, Any]] = []
    if isinstance(model, AdaptedModel):
        for adapter, cfg in model.peft_config.items():
            if isinstance(cfg, LoraPlusConfig):
                specs += loraplus_groups(adapter, loraplus_lr_ratio or cfg.loraplus_lr_ratio,
                                         loraplus_lr_embedding or cfg.loraplus_lr_embedding)
            elif isinstance(cfg, LoraConfig) and loraplus_lr_ratio is not None:
                specs += loraplus_groups(adapter, loraplus_lr_ratio, loraplus_lr_embedding or 1e-6)
            else:
                specs += cfg.optimizer_groups(adapter)
    else:
        specs = method_param_groups(model)
    if not specs:
        raise ConfigError("create_loraplus_optimizer: the model holds no LoraPlusConfig adapter; adapt it with "
                          "up.LoraPlusConfig(...) or pass loraplus_lr_ratio=... for its LoRA adapters")
    compiled = [re.compile(s["params"]) for s in specs]
    members: list[list[nn.Parameter]] = [[] for _ in specs]
    default: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = next((i for i, rx in enumerate(compiled) if rx.search(name)), None)
        (default if k is None else members[k]).append(p)
    groups = [{"params": default, "lr": lr, "weight_decay": loraplus_weight_decay}] if default else []
    for spec, params in zip(specs, members):
        if params:
            group_lr = spec["lr"] if spec.get("lr") is not None else lr * (spec.get("lr_scale") or 1.0)
            groups.append({"params": params, "lr": float(group_lr), "weight_decay": loraplus_weight_decay})
    return optimizer_cls(groups, lr=lr, **kwargs)


LoraConfig.strategy_keys["loraplus_lr_ratio"] = LoraPlusConfig
register("loraplus", LoraPlusConfig, LoraDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                             quantized_base=True, peft_compatible=True),
         exports=(create_loraplus_optimizer,))
