"""Calibration statistics for data-aware inits: per-target input activations, optionally weight gradients.

Core collects them on the frozen base before injection when a config asks (`needs_calibration()`)
and hands each target's `TargetStats` to its delta's `create`. What an init does with them
(an SVD of the activations, a projection of the gradient) is the method's business.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import layers
from .errors import ConfigError


@dataclass
class TargetStats:
    """What one target saw over the calibration batches."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # (tokens, in) per batch, detached
    gradient: torch.Tensor | None = None  # dL/dW as dense (out, in), summed over batches

    def activations(self) -> torch.Tensor:
        """All input rows seen, (tokens, in)."""
        return torch.cat(self.inputs, 0)

    def gram(self) -> torch.Tensor:
        """X^T X over every input row (in, in), in float32."""
        x = self.activations().float()
        return x.T @ x


def _call(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def collect(model: nn.Module, targets: list[tuple[str, nn.Module]], batches: Iterable, kind: str,
            owner: str = "config") -> dict[str, TargetStats]:
    """Run `batches` through the frozen `model` and record each target's inputs (and, for kind
    "gradients", the gradient of the output's `.loss` with respect to its weight)."""
    batches = list(batches or [])
    if not batches:
        raise ConfigError(f"{owner}: this init needs calibration data: pass calibration=[batch, ...] (model "
                          f"inputs as dicts{', with labels so the output has a loss' if kind == 'gradients' else ''})")
    stats = {path: TargetStats() for path, _ in targets}
    modules = dict(targets)
    handles = []
    for path, module in targets:
        def record(mod, args, path=path):
            stats[path].inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        handles.append(module.register_forward_pre_hook(record))
    weights = {}
    if kind == "gradients":
        for path, module in targets:
            if layers.is_quantized(module):
                raise ConfigError(f"{owner}: gradient-based inits need an unquantized weight at '{path}'")
            weights[path] = module.weight
    flags = {p: p.requires_grad for p in weights.values()}
    was_training = model.training
    model.eval()
    try:
        for p in weights.values():
            p.requires_grad_(True)
        for batch in batches:
            if kind == "gradients":
                loss = getattr(_call(model, batch), "loss", None)
                if loss is None:
                    raise ConfigError(f"{owner}: a calibration batch gave no loss; include labels in each batch")
                grads = torch.autograd.grad(loss, list(weights.values()))
                for path, g in zip(weights, grads):
                    g = layers.to_param_layout(modules[path], g.detach())  # stored layout -> (out, in)
                    stats[path].gradient = g if stats[path].gradient is None else stats[path].gradient + g
            else:
                with torch.no_grad():
                    _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return stats

