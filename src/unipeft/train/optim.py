"""The optimizer (AdamW, 8-bit AdamW, GaLore, zeroth-order) with parameter groups chosen by name patterns, and
warm-up + linear/cosine schedules."""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError


def param_groups(model: nn.Module, cfg: Any, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by the first pattern (regex search on the name) that matches.

    `cfg` is the optimizer section; `extra` holds groups a method asks for (after the user's).
    Parameters no pattern matches form the default group. A user pattern matching nothing is
    an error (a typo would otherwise silently train with the wrong learning rate).
    """
    specs: list[dict[str, Any]] = [{"params": g.params, "lr": g.lr, "lr_scale": g.lr_scale,
                                    "weight_decay": g.weight_decay, "user": True} for g in cfg.groups]
    specs += [{**g, "user": False} for g in (extra or [])]
    compiled = []
    for i, spec in enumerate(specs):
        try:
            compiled.append(re.compile(spec["params"]))
        except re.error as exc:
            raise ConfigError(f"optimizer.groups[{i}].params: bad regex {spec['params']!r} ({exc})") from None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameter; check the method section")
    members: list[list[nn.Parameter]] = [[] for _ in specs]
    default: list[nn.Parameter] = []
    for name, p in named:
        for k, rx in enumerate(compiled):
            if rx.search(name):
                members[k].append(p)
                break
        else:
            default.append(p)
    groups: list[dict[str, Any]] = []
    if default:
        groups.append({"params": default, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "default"})
    for i, (spec, params) in enumerate(zip(specs, members)):
        if not params:
            if spec["user"]:
                sample = ", ".join(n for n, _ in named[:4])
                raise ConfigError(f"optimizer.groups[{i}].params={spec['params']!r} matches no trainable "
                                  f"parameter; trainable names look like: {sample}")
            continue
        lr = spec.get("lr")
        if lr is None:
            lr = cfg.lr * (spec.get("lr_scale") or 1.0)
        wd = spec.get("weight_decay")
        groups.append({"params": params, "lr": float(lr), "name": spec["params"],
                       "weight_decay": cfg.weight_decay if wd is None else float(wd)})
    return groups


def build_optimizer(model: nn.Module, cfg: Any, extra: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters, with the configured groups (ConfigError for a
    setting it cannot honour, before any training)."""
    groups = param_groups(model, cfg, extra)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name in ("adamw8bit", "paged_adamw8bit"):
        from .lowbit import build_8bit

        return build_8bit(groups, cfg)
    if cfg.name.startswith("galore_"):
        from .galore import build_galore

        return build_galore(model, groups, cfg)
    from .zo import build_zo  # mezo, sparse_mezo, spsa_gc

    return build_zo(model, groups, cfg)


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """Warm-up length: schedule.warmup_steps, else warmup_ratio of the run."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(name: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then linear/cosine decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_factor` to every group's own lr."""
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.name, s, warm, total_steps))
