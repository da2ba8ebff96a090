"""The `search:` section of a run config: objectives, sampler, pruner, per-trial budget and the space.

    search:
      trials: 20
      objectives: [valid_accuracy, trainable_params]   # valid_<metric>, trainable_params, step_seconds, peak_mib
      sampler: nsga2                                   # nsga2 | motpe | tpe | gp | random | grid
      seed: 0
      budget: {max_steps: 100, eval_every: 25}         # run-config keys every trial sets
      pruner: {name: median, warmup_steps: 25, startup_trials: 3}   # none | median | percentile
      space: {...}                                     # see search/space.py
      output_dir: runs/search                          # trial-NNNN/ run folders, study.db, pareto.{md,png,json}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..train.config import RunConfig, apply_overrides, config_from_dict, parse_overrides
from ..train.schema import from_dict, parse_yaml
from .space import Space, parse_space

SAMPLERS = ("nsga2", "motpe", "tpe", "gp", "random", "grid")
PRUNERS = ("none", "median", "percentile")
METRICS = {"classification": ("accuracy", "loss", "macro_f1"), "causal_lm": ("token_accuracy", "loss", "perplexity")}
MINIMISED = ("loss", "perplexity", "trainable_params", "step_seconds", "peak_mib")


@dataclass
class PrunerConfig:
    """Stopping hopeless trials on their intermediate validation score (the first valid_* objective)."""

    name: str = "median"
    warmup_steps: int = 0  # no pruning before this step
    startup_trials: int = 3  # no pruning until this many trials have finished
    percentile: float = 25.0  # for 'percentile': keep the top (100 - this)%


@dataclass
class SearchConfig:
    """How to search; `space` is parsed into a Space against the method registry."""

    trials: int = 20
    objectives: list[str] = field(default_factory=lambda: ["valid_accuracy", "trainable_params"])
    sampler: str = "nsga2"
    seed: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    space: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/search"
    heartbeat: int = 10  # seconds between a running trial's heartbeats; a killed one fails after 3 of them

    def validate(self, task: str, sections: list[str]) -> Space:
        if self.trials < 1:
            raise ConfigError(f"search.trials: expected a positive integer, got {self.trials}")
        if not self.objectives:
            raise ConfigError("search.objectives: empty; e.g. [valid_accuracy, trainable_params]")
        known = [f"valid_{m}" for m in METRICS[task]] + ["trainable_params", "step_seconds", "peak_mib"]
        for name in self.objectives:
            if name not in known:
                raise ConfigError(f"search.objectives: {name!r} is never reported for task {task} "
                                  f"(known: {', '.join(known)})")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"search.objectives: listed twice in {self.objectives}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"search.sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler == "tpe" and len(self.objectives) > 1:
            raise ConfigError("search.sampler: tpe is single-objective; use motpe (TPE over several objectives)")
        if self.pruner.name not in PRUNERS:
            raise ConfigError(f"search.pruner.name: expected one of {', '.join(PRUNERS)}, got {self.pruner.name!r}")
        if self.heartbeat < 1:
            raise ConfigError(f"search.heartbeat: expected a positive number of seconds, got {self.heartbeat}")
        for key in self.budget:
            if key.split(".")[0] not in sections:
                raise ConfigError(f"search.budget.{key}: not a run-config key")
        space = parse_space(self.space, sections)
        if self.sampler == "grid" and self.trials > space.points():
            raise ConfigError(f"search.trials: {self.trials} trials but the grid has {space.points()} points")
        return space

    def directions(self) -> list[str]:
        return ["minimize" if any(n.endswith(m) for m in MINIMISED) else "maximize" for n in self.objectives]

    @property
    def quality(self) -> str | None:
        """The first validation objective: what the pruner watches."""
        return next((n for n in self.objectives if n.startswith("valid_")), None)


@dataclass
class SearchPlan:
    """A parsed search: the run config's mapping (without `search`), its settings and the space."""

    run: dict[str, Any]
    search: SearchConfig
    space: Space
    source: str

    def trial_config(self, method: dict[str, Any], overrides: list[tuple[str, Any]], output_dir: str) -> RunConfig:
        """The run config of one trial (raises ConfigError when the sampled combination is invalid)."""
        data = dict(self.run)
        if method:
            base = data.get("method") or {}
            base = {"name": base} if isinstance(base, str) else dict(base)
            data["method"] = {**base, **method} if base.get("name") == method["name"] else method
        data = apply_overrides(data, [*self.search.budget.items(), *overrides])
        data["output_dir"] = output_dir
        return config_from_dict(data, f"{self.source} (trial)")


def load_search(path: str | Path, overrides: list[str] | None = None) -> SearchPlan:
    """Read CONFIG.yaml with its `search:` section; `--search.X v` overrides the search, others the run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
        raise ConfigError(f"{path}: no `search:` section (objectives, sampler, space, ...)")
    data = dict(data)
    search = dict(data.pop("search"))
    pairs = parse_overrides(overrides or [])
    for key, value in [(k[len("search."):], v) for k, v in pairs if k.startswith("search.")]:
        head, _, rest = key.partition(".")
        search[head] = {**(search.get(head) or {}), rest: value} if rest else value
    data = apply_overrides(data, [(k, v) for k, v in pairs if not k.startswith("search.")])
    if isinstance(search.get("pruner"), str):
        search["pruner"] = {"name": search["pruner"]}
    scfg = from_dict(SearchConfig, search, "search")
    base = config_from_dict(data, str(path))  # the run config itself must be valid
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    space = scfg.validate(base.task, sections)
    return SearchPlan(data, scfg, space, str(path))
