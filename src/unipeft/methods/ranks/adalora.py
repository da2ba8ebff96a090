"""AdaLoRA (Zhang et al. 2023): SVD-form deltas whose ranks a budget schedule prunes by importance.

`total_step` may be left None: the run's number of optimizer steps is then checked against the
schedule and recorded in the adapter's config when training begins (PEFT requires the field, so
a folder saved before training with it unset does not load in PEFT).

Phases over `total_step` optimizer steps: steps <= tinit keep every triplet; then the budget (total
number of kept triplets) falls cubically from init_r x modules to target_r x modules at step
total_step - tfinal, the triplets of lowest importance (sensitivity EMA x uncertainty, see
importance.py) having their singular value E masked to zero every deltaT steps; at step
total_step - tfinal the final mask is fixed and recorded in the adapter's config as PEFT's
`rank_pattern` ({"<module>.lora_E": [kept?] * init_r}), and the deltas are resized to the kept
triplets in place (core/resize.py, optimizer state included). The orthogonal regulariser
orth_reg_weight * mean ||A A^T - I|| + ||B^T B - I|| is added to the gradients before each
optimizer step (after gradient clipping, where PEFT adds it to the loss before clipping).

Difference from PEFT during the last tfinal steps: PEFT keeps the pruned rows and re-masks E after
every step, so its regulariser still sees them; here they are gone. Outputs, masks and saved files
agree (a PEFT folder saved with a rank_pattern holds the kept triplets only, as ours does).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import non_negative, non_negative_int, positive_int
from ..lora.config import LoraConfig
from .importance import FACTORS, GradCaptureCallback, Sensitivity, factor_params


def _open_unit(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{owner}.{name}: expected a number with 0 < {name} < 1, got {value!r}")


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: out = base(x) + B (A * E) x * alpha / init_r, ranks pruned from init_r to target_r on average."""

    peft_type = "ADALORA"
    peft_class = "AdaLoraConfig"

    target_r: int = positive_int(8)
    init_r: int = positive_int(12)
    tinit: int = non_negative_int(0)
    tfinal: int = non_negative_int(0)
    deltaT: int = positive_int(1)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = non_negative(0.5)
    total_step: int | None = None  # None: the run's number of optimizer steps, recorded when training begins
    rank_pattern: dict | None = None  # PEFT's: {"<module path>.lora_E": [bool] * init_r}, set by the allocator

    def validate(self) -> None:
        AdapterConfig.validate(self)
        name = type(self).__name__
        if self.use_dora or self.loftq_config or self.init != "kaiming" or self.bias != "none":
            raise ConfigError(f"{name}: AdaLoRA supports neither use_dora, loftq_config, bias nor init other than "
                              f"the default (init_lora_weights=True); got use_dora={self.use_dora}, "
                              f"init={self.init!r}, bias={self.bias!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:  # unused, as in PEFT, but sane
            raise ConfigError(f"{name}.r: rank must be a positive integer, got {self.r!r} (AdaLoRA uses init_r)")
        for f in ("beta1", "beta2"):
            _open_unit(name, f, getattr(self, f))
        t = self.total_step
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
                raise ConfigError(f"{name}.total_step: expected the run's positive number of optimizer steps (or "
                                  f"None: the run's), got {t!r}")
            self.check_schedule(t)
        if self.target_r > self.init_r:
            raise ConfigError(f"{name}.target_r: the budget prunes ranks, so target_r must be <= init_r={self.init_r}, "
                              f"got {self.target_r}")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or len(mask) != self.init_r or not all(isinstance(m, bool) for m in mask):
                raise ConfigError(f"{name}.rank_pattern[{key!r}]: expected a list of {self.init_r} booleans (kept "
                                  f"triplets), got {mask!r}")

    def check_schedule(self, total_step: int) -> None:
        """ConfigError unless tinit + tfinal < total_step (a budgeting phase must remain)."""
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(f"{type(self).__name__}.tinit/tfinal: tinit + tfinal must be < total_step to leave a "
                              f"budgeting phase, got tinit={self.tinit} + tfinal={self.tfinal} >= "
                              f"total_step={total_step}")

    # ---- what the SVD deltas read -------------------------------------------------------------
    random_init = False

    def rank_of(self, path: str) -> int:
        """init_r, or the number of kept triplets the recorded rank_pattern gives this module."""
        mask = self.mask_of(path)
        return self.init_r if mask is None else sum(mask)

    def mask_of(self, path: str) -> list[bool] | None:
        """The recorded keep-mask of the module at `path` (PEFT's key: "<module path>.lora_E")."""
        return (self.rank_pattern or {}).get(f"{path}.lora_E")

    def scale_of(self, path: str) -> float:
        """PEFT: scaling = lora_alpha (or r when alpha <= 0), divided by ranknum = init_r (+ 1e-5)."""
        scaling = self.alpha if self.alpha > 0 else float(self.init_r)
        return float(torch.tensor(scaling, dtype=torch.float32) / (torch.tensor(float(self.init_r)) + 1e-5))

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        return self.rank_of(path), self.alpha

    def training_callbacks(self, model, adapter_name: str) -> list:
        if self.inference_mode:
            return []
        return [RankAllocator(model, adapter_name)]

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        # E starts at 0 and A, B at N(0, 0.02): a large alpha makes a few steps visible in the output
        return {"init_r": 3, "target_r": 2, "alpha": 64, "total_step": 10, "tinit": 2, "tfinal": 2}


class RankAllocator(GradCaptureCallback):
    """AdaLoRA's budget schedule and masking (PEFT's RankAllocator.update_and_allocate, per optimizer step)."""

    def __init__(self, model, adapter_name: str) -> None:
        cfg = model.peft_config[adapter_name]
        super().__init__(model, adapter_name, cfg.orth_reg_weight)
        self.sens = Sensitivity(cfg.beta1, cfg.beta2)
        self.masks: dict[str, list[bool]] = {}  # the latest mask of each module (budget phase)
        self.init_bgt = sum(d.r for d in self.deltas().values())
        self.target_bgt = cfg.target_r * len(self.deltas())

    def on_train_begin(self, ctx) -> None:
        super().on_train_begin(ctx)
        cfg = self.config
        if cfg.total_step is None:  # the run's length, checked and recorded (PEFT's files need it)
            cfg.check_schedule(ctx.max_steps)
            self.model.replace_deltas(self.adapter, {}, cfg.replace(total_step=ctx.max_steps))
            return
        if ctx.max_steps and ctx.max_steps < cfg.total_step - cfg.tfinal:
            warnings.warn(f"AdaLoraConfig.total_step={cfg.total_step}: this run has {ctx.max_steps} steps, so the "
                          f"final budget (step {cfg.total_step - cfg.tfinal}) is never reached; set total_step to "
                          f"the run's number of optimizer steps", stacklevel=2)

    @property
    def config(self) -> AdaLoraConfig:
        """The adapter's current (frozen) config."""
        return self.model.peft_config[self.adapter]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step), as PEFT computes them."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def update_importance(self) -> None:
        """Fold the step's |w * g| (weights after the step, gradients captured before it) into the EMAs."""
        for key, p in factor_params(self.deltas()).items():
            if key in self.grads:
                self.sens.update(key, p.detach(), self.grads[key])

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E of the lowest-scoring triplets so that `budget` remain; returns the keep-masks."""
        deltas = self.deltas()
        scores = {path: self.sens.triplet_scores(path) for path in deltas}
        k = self.init_bgt - budget
        if k <= 0:
            return {path: [True] * d.r for path, d in deltas.items()}
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item()
        masks = {}
        with torch.no_grad():
            for path, d in deltas.items():
                drop = scores[path] <= threshold
                d.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
                masks[path] = (~drop).tolist()
        return masks

    def on_step_end(self, ctx) -> None:
        cfg, step = self.config, ctx.step
        final = cfg.total_step - cfg.tfinal
        if step > final or not self.grads:
            return
        if step < final:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.masks = self.mask_to_budget(budget)
        else:  # the final budget: record the pattern, keep only the kept triplets
            self.masks = self.mask_to_budget(self.budget_schedule(step)[0])
            self.prune(ctx.optimizer)
            self.sens.reset()
        self.grads = {}

    def prune(self, optimizer) -> None:
        """Resize every delta to its kept triplets and record PEFT's rank_pattern in the config."""
        deltas = self.deltas()
        for path, d in deltas.items():
            keep = [i for i, m in enumerate(self.masks[path]) if m]
            d.set_rank(keep, len(keep), optimizer)
        pattern = {f"{path}.lora_E": list(mask) for path, mask in self.masks.items()}
        self.model.replace_deltas(self.adapter, deltas, self.config.replace(rank_pattern=pattern))

    def state_dict(self) -> dict[str, Any]:
        return {"sens": self.sens.state_dict(), "masks": dict(self.masks), "init_bgt": self.init_bgt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sens.load_state_dict(state.get("sens", {}))
        self.masks = dict(state.get("masks", {}))
        self.init_bgt = state.get("init_bgt", self.init_bgt)


__all__ = ["AdaLoraConfig", "RankAllocator", "FACTORS"]
