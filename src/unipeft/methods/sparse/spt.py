"""SPT: sensitivity-aware selection under a parameter budget, with LoRA where a matrix needs too many entries.

`spt_adapt(base, config, batches, loss_fn)` measures each target weight's sensitivity (squared
gradient of the task loss, accumulated over a few batches: the first-order Taylor estimate of
the loss change), keeps the globally most sensitive `budget` fraction of the target weights,
and per matrix trains either those entries (sparse delta) or, when the matrix holds more of
them than a rank-`lora_r` LoRA has parameters (`lora_threshold`), a LoRA instead, which is the
cheaper structured form. The allocation is written into the config (`allocation`,
`lora_modules`), so a saved adapter reloads with the same structure.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import positive_int, unit_ratio
from ...core.registry import Capabilities, register
from ...core.targets import name_matches, pattern_key, select_targets
from .base import SPARSE_LAYERS, SparseDelta, count_for
from ..lora import LoraConfig, LoraDelta


@dataclass
class SptConfig(AdapterConfig):
    """SPT: `budget` of the target weights train, sparse per matrix or LoRA (rank `lora_r`) where that is cheaper."""

    peft_type = "SPT"

    budget: float = unit_ratio(0.01, "budget")
    lora_r: int = positive_int(4)  # the fallback LoRA's rank and alpha (checked again by LoraConfig)
    lora_alpha: float = 8.0
    lora_threshold: int | None = None  # None: a matrix's LoRA parameter count r * (in + out)
    allocation: dict[str, int] = field(default_factory=dict)  # module -> selected entries (from spt_adapt)
    lora_modules: list[str] = field(default_factory=list)  # modules that use LoRA instead

    def validate(self) -> None:
        super().validate()
        self.lora_config()  # the fallback LoRA's fields are LoRA's rules, declared there
        bad = {k: v for k, v in self.allocation.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ConfigError(f"SptConfig.allocation: entry counts must be positive integers, got {bad!r}")

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Every other target falls back to LoRA, so both of SPT's delta forms are exercised."""
        return {"lora_modules": candidates[1::2], "lora_r": 2}

    def lora_config(self) -> LoraConfig:
        """The LoRA used on `lora_modules`."""
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha)

    def threshold(self, out_f: int, in_f: int) -> int:
        """Above this many sensitive entries a matrix switches to LoRA."""
        return self.lora_threshold if self.lora_threshold is not None else self.lora_r * (out_f + in_f)


class SptSparse(SparseDelta):
    """The sparse part: `allocation[path]` entries (default: budget x size), saved as `<path>.spt_values/_indices`."""

    prefix = "spt"

    def __init__(self, base: nn.Module, config: SptConfig, path: str, bank=None) -> None:
        w = layers.dense_weight(base) if isinstance(base, SPARSE_LAYERS) else torch.zeros(1, 1)
        key = pattern_key(config.allocation, path)
        k = config.allocation[key] if key else count_for(config.budget, w.numel())
        if k > w.numel():
            raise ConfigError(f"SptConfig.allocation['{key}']={k} exceeds the {w.numel()} entries of '{path}'")
        # Placeholder order (largest |W|) until spt_adapt sets the sensitive entries or a file is loaded.
        init = torch.topk(w.detach().abs().flatten(), k).indices
        super().__init__(base, config, path, bank, k=k, init_indices=init)


class SptDelta(SptSparse):
    """Registered class: LoRA on `lora_modules`, the sparse delta elsewhere."""

    @classmethod
    def create(cls, base: nn.Module, config: SptConfig, path: str, bank=None, calibration=None):
        if config.lora_modules and name_matches(path, config.lora_modules):
            return LoraDelta.create(base, config.lora_config(), path)
        return SptSparse(base, config, path, bank)


def sensitivity(base: nn.Module, paths: list[str], batches: Iterable, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Accumulated squared gradients of the target weights (as (out, in)); the base is left as it was."""
    modules = dict(base.named_modules())
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    for p in base.parameters():
        p.requires_grad_(False)
    weights = {path: modules[path].weight for path in paths}
    for w in weights.values():
        w.requires_grad_(True)
    scores = {path: torch.zeros_like(layers.dense_weight(modules[path]), dtype=torch.float32) for path in paths}
    try:
        for batch in batches:
            loss = loss_fn(base, batch)
            grads = torch.autograd.grad(loss, list(weights.values()))
            for path, g in zip(weights, grads):
                g2 = layers.to_param_layout(modules[path], g)  # (out, in): the transpose is its own inverse
                scores[path] += g2.detach().float() ** 2
    finally:
        for n, p in base.named_parameters():
            p.requires_grad_(flags[n])
    return scores


def spt_adapt(base: nn.Module, config: SptConfig, batches: Iterable, loss_fn: Callable,
              adapter_name: str = "default"):
    """Adapt `base` with SPT: sensitivity on `batches` (loss_fn(model, batch) -> scalar), allocate, select."""
    from ...core.model import adapt

    targets = select_targets(base, config, SPARSE_LAYERS)
    paths = [p for p, _ in targets]
    scores = sensitivity(base, paths, list(batches), loss_fn)
    total = sum(s.numel() for s in scores.values())
    tau = max(1, int(config.budget * total))
    flat_all = torch.cat([scores[p].flatten() for p in paths])
    cut = torch.topk(flat_all, tau).values.min()
    allocation, lora, chosen = {}, [], {}
    remaining = tau
    for path in paths:
        s = scores[path]
        n = min(int((s > cut).sum()) + int((s == cut).sum()), remaining)  # ties at the cut: up to the budget
        if n == 0:
            continue
        out_f, in_f = s.shape
        lora_cost = config.lora_r * (out_f + in_f)
        if n > config.threshold(out_f, in_f) and lora_cost <= remaining:
            lora.append(path)
            remaining -= lora_cost
        else:
            allocation[path] = n
            chosen[path] = torch.topk(s.flatten(), n).indices
            remaining -= n
    if not allocation and not lora:
        raise ConfigError("spt_adapt: the budget selects no weight; raise SptConfig.budget")
    cfg = config.replace(target_modules=[*allocation, *lora], allocation=allocation, lora_modules=lora)
    model = adapt(base, cfg, adapter_name)
    for d in model.deltas(adapter_name):
        if isinstance(d, SptSparse):
            d.set_selection(chosen[d.path])
    return model


register("spt", SptConfig, SptDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS),
         exports=(spt_adapt,))
