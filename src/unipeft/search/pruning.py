"""Optuna's pruners on the trainer's validation evaluations, for single- and multi-objective studies.

Optuna refuses `trial.report` in a multi-objective study, so the intermediate validation scores are kept as
the trial's user attribute `intermediate` ({step: value}) and the pruner decides on a single-objective
mirror: an in-memory study (the quality objective's direction) holding the finished trials with those
intermediate values. The pruner itself is Optuna's (MedianPruner, PercentilePruner). (Hyperband keeps bracket
state per study, which a rebuilt mirror would not carry: not offered.)
"""
from __future__ import annotations

from typing import Any

from ..core.hooks import TrainerCallback
from .config import PrunerConfig


def build_pruner(cfg: PrunerConfig):
    import optuna
    if cfg.name == "none":
        return None
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)
    return optuna.pruners.PercentilePruner(100.0 - cfg.percentile, n_startup_trials=cfg.startup_trials,
                                           n_warmup_steps=cfg.warmup_steps)


def _mirror(study, direction: str):
    """A single-objective in-memory study of `study`'s finished trials and their intermediate values."""
    import optuna
    from optuna.trial import TrialState, create_trial
    mirror = optuna.create_study(direction=direction)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        inter = {int(k): float(v) for k, v in (t.user_attrs.get("intermediate") or {}).items()}
        if not inter:
            continue
        value = inter[max(inter)] if t.state == TrialState.PRUNED else t.user_attrs.get("quality", inter[max(inter)])
        mirror.add_trial(create_trial(state=t.state, value=None if t.state == TrialState.PRUNED else value,
                                      params={}, distributions={}, intermediate_values=inter))
    return mirror


class PruningCallback(TrainerCallback):
    """Records every validation score of the watched metric and stops the trial when the pruner says so."""

    def __init__(self, study, trial, metric: str, direction: str, pruner) -> None:
        self.study, self.trial, self.metric, self.direction, self.pruner = study, trial, metric, direction, pruner
        self.values: dict[int, float] = {}

    def on_train_begin(self, ctx) -> None:
        model = ctx.model
        self.trial.set_user_attr("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad))

    def on_evaluate(self, ctx, metrics: dict[str, float]) -> None:
        import optuna
        from optuna.trial import FrozenTrial, TrialState
        if self.metric not in metrics:
            return
        self.values[int(ctx.step)] = float(metrics[self.metric])
        self.trial.set_user_attr("intermediate", {str(k): v for k, v in self.values.items()})
        if self.pruner is None:
            return
        mirror = _mirror(self.study, self.direction)
        current = FrozenTrial(number=len(mirror.trials), state=TrialState.RUNNING, value=None, datetime_start=None,
                              datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                              intermediate_values=dict(self.values), trial_id=len(mirror.trials))
        if self.pruner.prune(mirror, current):
            raise optuna.TrialPruned(f"step {ctx.step}: {self.metric} {self.values[int(ctx.step)]:.4f}")


def objective_values(names: list[str], summary: dict[str, Any]) -> list[float]:
    """The objectives of a finished trial from its run summary (KeyError names a missing one)."""
    out = []
    for name in names:
        if name == "trainable_params":
            out.append(float(summary["trainable_params"]))
        elif name == "peak_mib":
            if summary.get("peak_mib") is None:
                raise KeyError("objective peak_mib: the peak resident memory cannot be measured here "
                               "(needs Linux's /proc/self/clear_refs)")
            out.append(float(summary["peak_mib"]))
        elif name == "step_seconds":
            out.append(float(summary["train_seconds"]) / max(1, int(summary["steps"])))
        else:
            metric = name[len("valid_"):]
            if metric not in summary.get("valid", {}):
                raise KeyError(f"objective {name}: the run reported no validation {metric!r}")
            out.append(float(summary["valid"][metric]))
    return out
