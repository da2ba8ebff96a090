"""Per-module forgetting scores from training dynamics, their ranking, and FPF's module selection.

FPF (Zhao et al., "Does continual learning equally forget all parameters?") observes that
the modules whose parameters move most between tasks are the task-specific, forgetting-prone
ones. The score of a module is its mean absolute parameter change per parameter between
consecutive task ends, averaged over the task transitions seen so far (normalising by the
parameter count keeps small modules such as BatchNorm comparable to large convolutions).
`score="relative"` uses ||change|| / ||parameters|| instead, which does not depend on the
scale of a module's initialisation (small-fan-in layers start with large weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.model import AdaptedModel
from .errors import ContinualError

ROOT = "(root)"
SCORES = ("mean_abs", "relative")


def module_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped by the module FPF would select.

    For an AdaptedModel the groups are its sites (the adapter's parameters at each adapted
    module, named by the base module's path); for a plain model, every module that directly
    owns trainable parameters.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    if isinstance(model, AdaptedModel):
        for site in model.sites():  # keeps the site order of the model
            for name in site.deltas:
                delta = model.delta_at(name, site.path)
                params = [(f"{name}.{n}", p) for n, p in delta.named_parameters() if p.requires_grad]
                if params:
                    groups.setdefault(site.path, []).extend(params)
    else:
        for path, module in model.named_modules():
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if params:
                groups[path or ROOT] = params
    if not groups:
        raise ContinualError(f"{type(model).__name__} has no trainable parameter to track")
    return groups


def module_types(model: nn.Module) -> dict[str, str]:
    """Class name of the (base) module behind each group."""
    if isinstance(model, AdaptedModel):
        return {s.path: type(s.base_layer).__name__ for s in model.sites()}
    return {(p or ROOT): type(m).__name__ for p, m in model.named_modules()}


@dataclass
class DriftReport:
    """Modules ranked by forgetting score (highest first), with what FPF selected."""

    rows: list[dict] = field(default_factory=list)  # module, type, params, score, rank, selected
    transitions: int = 0

    @property
    def selected(self) -> list[str]:
        """Names of the selected modules, best-ranked first."""
        return [r["module"] for r in self.rows if r["selected"]]

    def table(self, limit: int = 30) -> str:
        """A readable ranking (first `limit` rows)."""
        width = max([len(r["module"]) for r in self.rows[:limit]] + [6])
        lines = [f"{'rank':>4}  {'module':<{width}}  {'type':<14} {'params':>9}  {'score':>10}  FPF",
                 *(f"{r['rank']:>4}  {r['module']:<{width}}  {r['type']:<14} {r['params']:>9,}  "
                   f"{r['score']:>10.3e}  {'*' if r['selected'] else ''}" for r in self.rows[:limit])]
        if len(self.rows) > limit:
            lines.append(f"... {len(self.rows) - limit} more modules")
        total = sum(r["params"] for r in self.rows)
        chosen = sum(r["params"] for r in self.rows if r["selected"])
        lines.append(f"scores from {self.transitions} task transition(s); FPF trains {len(self.selected)} "
                     f"module(s), {chosen:,} of {total:,} tracked parameters ({100 * chosen / max(total, 1):.1f}%)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"transitions": self.transitions, "rows": self.rows}


class DriftTracker:
    """Snapshots the trainable parameters at task ends and scores each module by how much it moves."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.groups = module_groups(model)
        self.sizes = {g: sum(p.numel() for _, p in ps) for g, ps in self.groups.items()}
        self.types = module_types(model)
        self.snapshots: list[dict[str, torch.Tensor]] = [self._flat()]
        self._changes: list[dict[str, tuple[float, float]]] = []  # one entry per pair of consecutive snapshots

    def _flat(self) -> dict[str, torch.Tensor]:
        return {g: torch.cat([p.detach().flatten().float() for _, p in ps]).clone() for g, ps in self.groups.items()}

    @staticmethod
    def _change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        """Per module: (mean absolute change, change norm relative to the old parameters' norm)."""
        return {g: (float((b[g] - a[g]).abs().mean()), float((b[g] - a[g]).norm() / a[g].norm().clamp(min=1e-12)))
                for g in a}

    def end_task(self) -> None:
        """Record the parameters at the end of a task."""
        now = self._flat()
        self._changes.append(self._change(self.snapshots[-1], now))
        self.snapshots = [self.snapshots[-1], now]  # only the last one is needed again

    def scores(self, score: str = "mean_abs") -> tuple[dict[str, float], int]:
        """(module -> score, number of transitions used); `score` is "mean_abs" or "relative".

        Uses the changes between task ends from the second task on; the first task's change
        (from initialisation) is generic learning, used only while nothing else exists, and
        then together with the change of the task in progress.
        """
        changes = self._changes[1:]
        if not changes:
            changes = self._changes + [self._change(self.snapshots[-1], self._flat())]
        if score not in SCORES:
            raise ContinualError(f"drift score {score!r} unknown; valid: {', '.join(SCORES)}")
        i = SCORES.index(score)
        return {g: sum(c[g][i] for c in changes) / len(changes) for g in self.groups}, len(changes)

    def report(self, budget: float = 0.1, top: int | None = None, include: list[str] | None = None,
               score: str = "mean_abs") -> DriftReport:
        """Rank modules by score and mark FPF's selection (see `select_modules`)."""
        scores, n = self.scores(score)
        chosen = set(select_modules(scores, self.sizes, budget, top, include))
        ranked = sorted(scores, key=lambda g: -scores[g])
        rows = [{"module": g, "type": self.types.get(g, "?"), "params": self.sizes[g], "score": scores[g],
                 "rank": i + 1, "selected": g in chosen} for i, g in enumerate(ranked)]
        return DriftReport(rows, n)


def select_modules(scores: dict[str, float], sizes: dict[str, int], budget: float = 0.1, top: int | None = None,
                   include: list[str] | None = None) -> list[str]:
    """FPF's selection: highest-scoring modules first while their parameters fit in `budget`.

    `budget` is a fraction of all tracked parameters; a module that would overflow it is
    skipped and smaller lower-ranked ones may still fit. The best-ranked module is always
    taken. `top` caps the number of modules; `include` forces modules in (e.g. the classifier).
    """
    if not 0 < budget <= 1:
        raise ContinualError(f"FPF budget: expected a fraction in (0, 1], got {budget!r}")
    unknown = sorted(set(include or []) - set(scores))
    if unknown:
        raise ContinualError(f"FPF include: no tracked module {unknown}; modules: {sorted(scores)}")
    total = sum(sizes.values())
    chosen = list(include or [])
    used = sum(sizes[g] for g in chosen)
    for g in sorted(scores, key=lambda g: -scores[g]):
        if top is not None and len(chosen) >= top:
            break
        if g in chosen:
            continue
        if not chosen or used + sizes[g] <= budget * total:
            chosen.append(g)
            used += sizes[g]
    return chosen
