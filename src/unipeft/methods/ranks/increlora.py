"""IncreLoRA (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning"): SVD-form deltas that start small and grow.

Every module starts at init_r triplets (P Λ Q as in AdaLoRA, svd.py). After tinit steps, every
deltaT steps the top_h modules by importance (mean score, sensitivity EMA x uncertainty, over all
their entries; importance.py) get one more triplet each, until the total rank reaches `budget`
(or a module reaches max_r). A new triplet has E = 0 (the output does not change) and A, B ~
N(0, 0.02); the optimizer's state grows with zeros (core/resize.py). The current ranks are
recorded in the adapter's config (`rank_pattern`: {module path: rank}), so saving, loading and
--resume rebuild the deltas at them. The orthogonal regulariser is AdaLoRA's.

Simplified from the paper: no "advance learning" pre-training of reserved ranks and no learning
rate restart after each growth; the scale is the constant alpha (the paper's scaling by rank is
left to the choice of alpha).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import fraction, non_negative, positive_int, positive_number
from .importance import GradCaptureCallback, Sensitivity, factor_params, resolved_budget
from .svd import SvdDelta


@dataclass
class IncreLoraConfig(AdapterConfig):
    """IncreLoRA: ranks grow from init_r towards a total `budget` at the most important modules."""

    peft_type = "INCRELORA"

    # Total rank over all modules; None: 4 per targeted module (at least init_r), resolved at injection.
    budget: int | None = positive_int(None, optional=True)
    init_r: int = positive_int(1)
    max_r: int = positive_int(8)
    top_h: int = positive_int(1)
    tinit: int = non_negative(0)
    deltaT: int = positive_int(10)
    alpha: float = positive_number(1.0)
    dropout: float = fraction(0.0, "0 <= dropout < 1")
    beta1: float = fraction(0.85, "0 <= beta1 < 1")
    beta2: float = fraction(0.85, "0 <= beta2 < 1")
    orth_reg_weight: float = non_negative(0.1)
    rank_pattern: dict[str, int] = field(default_factory=dict)

    random_init = False

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.init_r > self.max_r:
            raise ConfigError(f"{name}.init_r: expected init_r <= max_r={self.max_r}, got {self.init_r}")
        for key, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise ConfigError(f"{name}.rank_pattern[{key!r}]: expected a rank >= 0, got {r!r}")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"budget": resolved_budget(self, targets)}

    def rank_of(self, path: str) -> int:
        """The recorded rank of `path`, else init_r."""
        return self.rank_pattern.get(path, self.init_r)

    def scale_of(self, path: str) -> float:
        """The constant scale alpha."""
        return float(self.alpha)

    def training_callbacks(self, model, adapter_name: str) -> list:
        return [] if self.inference_mode else [RankGrower(model, adapter_name)]

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"budget": 2 * len(candidates), "max_r": 3, "deltaT": 1, "alpha": 64.0}


class IncreLoraDelta(SvdDelta):
    """IncreLoRA's delta: AdaLoRA's SVD form (its own class so the registry tells them apart)."""


def grow(model, adapter_name: str, picks: list[str], optimizer, sens: Sensitivity | None, seed: int) -> None:
    """Add one triplet at each module in `picks`; record the ranks in the adapter's config."""
    deltas = {d.path: d for d in model.deltas(adapter_name) if isinstance(d, SvdDelta)}
    for i, path in enumerate(picks):
        d = deltas[path]
        r = d.r
        keep = torch.arange(r)
        d.set_rank(keep, r + 1, optimizer, torch.Generator().manual_seed(seed * 1009 + i))
        if sens is not None:
            sens.resize(f"{path}.lora_A", keep, 0, r + 1)
            sens.resize(f"{path}.lora_E", keep, 0, r + 1)
            sens.resize(f"{path}.lora_B", keep, 1, r + 1)
    cfg = model.peft_config[adapter_name]
    pattern = {path: d.r for path, d in deltas.items()}
    model.replace_deltas(adapter_name, {p: deltas[p] for p in picks}, cfg.replace(rank_pattern=pattern))


class RankGrower(GradCaptureCallback):
    """IncreLoRA's schedule: importance every step, growth every deltaT steps after tinit."""

    def __init__(self, model, adapter_name: str) -> None:
        cfg = model.peft_config[adapter_name]
        super().__init__(model, adapter_name, cfg.orth_reg_weight)
        self.sens = Sensitivity(cfg.beta1, cfg.beta2)

    def module_scores(self) -> dict[str, float]:
        """Mean entry score of every module (0 before any update)."""
        out = {}
        for path in self.deltas():
            keys = [f"{path}.{n}" for n in ("lora_A", "lora_B", "lora_E")]
            if all(self.sens.has(k) for k in keys):
                total = sum(float(self.sens.score(k).sum()) for k in keys)
                count = sum(self.sens.score(k).numel() for k in keys)
                out[path] = total / max(1, count)
            else:
                out[path] = 0.0
        return out

    def on_step_end(self, ctx) -> None:
        if not self.grads:
            return
        cfg = self.model.peft_config[self.adapter]
        for key, p in factor_params(self.deltas()).items():
            self.sens.update(key, p.detach(), self.grads[key])
        self.grads = {}
        step = ctx.step
        if step <= cfg.tinit or (step - cfg.tinit) % cfg.deltaT:
            return
        deltas = self.deltas()
        left = cfg.budget - sum(d.r for d in deltas.values())
        open_ = [p for p, d in deltas.items() if d.r < cfg.max_r]
        if left <= 0 or not open_:
            return
        scores = self.module_scores()
        picks = sorted(open_, key=lambda p: (-scores[p], p))[:min(cfg.top_h, left)]
        grow(self.model, self.adapter, picks, ctx.optimizer, self.sens, step)

    def state_dict(self) -> dict[str, Any]:
        return {"sens": self.sens.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sens.load_state_dict(state.get("sens", {}))
