"""Shared allocation code: sensitivity importance with EMA and uncertainty, gradient capture, orthogonality.

Sensitivity of an entry is |w * dL/dw|; its smoothed value I_t = b1 I_{t-1} + (1 - b1) |w g|, its
uncertainty U_t = b2 U_{t-1} + (1 - b2) | |w g| - I_t |, and the entry's score is I_t * U_t
(AdaLoRA, Zhang et al. 2023; PEFT's RankAllocator). PEFT computes |w g| with the weights after
the optimizer step and the gradients of that step: `GradCapture` keeps the gradients from
on_before_optimizer_step (the trainer clears them before on_step_end).
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.errors import ConfigError
from ...core.hooks import TrainerCallback

FACTORS = ("lora_A", "lora_B", "lora_E")


class Sensitivity:
    """EMA sensitivity and uncertainty per (site path, factor name)."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    def update(self, key: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Fold in one step's |w * g|."""
        with torch.no_grad():
            ipt = (weight * grad).abs()
            avg = self.avg.get(key)
            if avg is None or avg.shape != ipt.shape:
                avg = torch.zeros_like(ipt)
                self.unc[key] = torch.zeros_like(ipt)
            avg = self.beta1 * avg + (1 - self.beta1) * ipt
            self.avg[key] = avg
            self.unc[key] = self.beta2 * self.unc[key] + (1 - self.beta2) * (ipt - avg).abs()

    def score(self, key: str) -> torch.Tensor:
        """Per-entry score I * U."""
        return self.avg[key] * self.unc[key]

    def has(self, key: str) -> bool:
        """Whether `key` has been updated at least once."""
        return key in self.avg

    def triplet_scores(self, path: str) -> torch.Tensor:
        """(r,) score of each triplet: E's score + mean over A's row + mean over B's column (PEFT's sum)."""
        e = self.score(f"{path}.lora_E").view(-1)
        a = self.score(f"{path}.lora_A").mean(dim=1)
        b = self.score(f"{path}.lora_B").mean(dim=0)
        return e + (a + b)

    def reset(self) -> None:
        """Forget everything (PEFT resets once the final budget is fixed)."""
        self.avg.clear()
        self.unc.clear()

    def resize(self, key: str, keep: torch.Tensor, dim: int, new_size: int) -> None:
        """Follow a rank change of the factor `key` (kept rows keep their statistics, new rows start at 0)."""
        from ...core.resize import _take

        if key in self.avg:
            self.avg[key] = _take(self.avg[key], dim, keep, new_size)
            self.unc[key] = _take(self.unc[key], dim, keep, new_size)

    def state_dict(self) -> dict[str, Any]:
        """Tensors for checkpoints."""
        return {"avg": {k: v.clone() for k, v in self.avg.items()}, "unc": {k: v.clone() for k, v in self.unc.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.avg = {k: v.clone() for k, v in state.get("avg", {}).items()}
        self.unc = {k: v.clone() for k, v in state.get("unc", {}).items()}


def factor_params(deltas: dict[str, Any]) -> dict[str, torch.nn.Parameter]:
    """{"<path>.<factor>": parameter} of SVD deltas."""
    return {f"{path}.{name}": getattr(d, name) for path, d in deltas.items() for name in FACTORS}


def capture_grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Copies of the current gradients (zeros where a parameter has none)."""
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}


def add_orth_grad(deltas: list, weight: float) -> float:
    """Add the gradient of weight * mean_k ||A A^T - I|| + ||B^T B - I|| (PEFT's regulariser averages
    over the 2 x modules factors) to the factors' gradients; returns the regulariser's value."""
    if weight == 0 or not deltas:
        return 0.0
    with torch.enable_grad():
        total = sum(d.orth_penalty() for d in deltas) / (2 * len(deltas))
        params = [p for d in deltas for p in (d.lora_A, d.lora_B)]
        grads = torch.autograd.grad(total * weight, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    return float(total.detach())


def refuse_multi_process(ctx, method: str) -> None:
    """Rank changes replace parameters, which DDP/FSDP hold in fixed buckets and shards: refuse clearly."""
    if ctx.world_size > 1:
        raise ConfigError(f"{method}: changing ranks during training needs a single process (DDP and FSDP keep "
                          f"fixed parameter buckets); got world_size={ctx.world_size}")


class GradCaptureCallback(TrainerCallback):
    """Base for allocators: adds the orthogonal regulariser's gradient, then keeps the step's gradients."""

    def __init__(self, model, adapter_name: str, orth_reg_weight: float) -> None:
        self.model, self.adapter = model, adapter_name
        self.orth_reg_weight = orth_reg_weight
        self.grads: dict[str, torch.Tensor] = {}

    def deltas(self) -> dict[str, Any]:
        """{path: delta} of the adapter (looked up each time: rebuilding replaces them)."""
        from .svd import SvdDelta  # (modules_to_save copies of the same adapter are left alone)

        return {d.path: d for d in self.model.deltas(self.adapter) if isinstance(d, SvdDelta)}

    def on_train_begin(self, ctx) -> None:
        refuse_multi_process(ctx, type(self.model.peft_config[self.adapter]).__name__)

    def on_before_optimizer_step(self, ctx) -> None:
        deltas = self.deltas()
        if not any(d.lora_E.requires_grad for d in deltas.values()):
            return
        add_orth_grad(list(deltas.values()), self.orth_reg_weight)
        self.grads = capture_grads(factor_params(deltas))


def resolved_budget(config, targets) -> int:
    """A rank-growing config's total budget (None: 4 per module, at least init_r), refused below the
    ranks the targets start with (before the model is touched)."""
    start = sum(config.rank_of(path) for path, _ in targets)
    budget = len(targets) * max(4, config.init_r) if config.budget is None else config.budget
    if budget < start:
        raise ConfigError(f"{type(config).__name__}.budget: the {len(targets)} targeted modules start with "
                          f"{start} ranks in total (init_r={config.init_r}), more than budget={budget}; "
                          f"raise budget to at least {start}")
    return budget
