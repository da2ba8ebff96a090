"""The search space of `unipeft search`: method families, their fields, and run-config keys, as Optuna
suggestions.

    space:
      method:                          # families among the registered methods, each with its own fields
        lora: {r: [2, 4, 8, 16], target_modules: [[query, value], [query, key, value, dense]]}
        ia3: {target_modules: [[key, value, intermediate.dense]]}
        prefix_tuning: {num_virtual_tokens: {low: 4, high: 32, log: true}}
      optimizer.lr: {low: 1.0e-4, high: 3.0e-2, log: true}      # any dotted run-config key

A list is a categorical choice (lists of lists choose among lists), {low, high[, log][, step]} an int or float
range (int when both ends are ints), a scalar a fixed value. Fields of a family are conditional parameters
named `<family>.<field>`; `method` itself is the categorical `method`. Everything is checked before a trial
runs: unknown families and fields, empty choices, low > high, a log range that includes 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError


@dataclass
class Param:
    """One dimension: categorical `choices`, or a numeric range."""

    name: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    fixed: Any = None
    is_fixed: bool = False

    def suggest(self, trial) -> Any:
        if self.is_fixed:
            return self.fixed
        if self.choices is not None:
            # Optuna's categorical values are scalars: lists are chosen by their JSON text
            shown = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in self.choices]
            picked = trial.suggest_categorical(self.name, shown)
            return self.choices[shown.index(picked)]
        if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float):
            return trial.suggest_int(self.name, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def parse_param(name: str, spec: Any) -> Param:
    """A Param from its YAML form, or a ConfigError naming `search.space.<name>`."""
    where = f"search.space.{name}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        return Param(name, choices=list(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: a range is {{low, high[, log][, step]}}, got keys {sorted(spec)}")
        low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: low and high must be numbers, got {low!r}, {high!r}")
        if low > high:
            raise ConfigError(f"{where}: low {low} is above high {high}")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        if log and step is not None:
            raise ConfigError(f"{where}: step and log cannot be combined (Optuna)")
        return Param(name, low=low, high=high, log=log, step=step)
    return Param(name, fixed=spec, is_fixed=True)


@dataclass
class Space:
    """Method families (each with its Params) and run-config Params."""

    families: dict[str, list[Param]]
    keys: list[Param]

    def sample(self, trial) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
        """(the method section, dotted run-config overrides) of one trial."""
        method: dict[str, Any] = {}
        if self.families:
            names = list(self.families)
            family = names[0] if len(names) == 1 else trial.suggest_categorical("method", names)
            method = {"name": family}
            for p in self.families[family]:
                method[p.name.split(".", 1)[1]] = p.suggest(trial)
        return method, [(p.name, p.suggest(trial)) for p in self.keys]

    def grid(self) -> dict[str, list[Any]]:
        """{Optuna parameter: its choices} for Optuna's GridSampler: every point of a space of lists and
        fixed values (a family's fields are conditional parameters, which a grid cannot hold)."""
        grid: dict[str, list[Any]] = {}
        if len(self.families) > 1:
            grid["method"] = list(self.families)
        for p in [*(q for ps in self.families.values() for q in ps), *self.keys]:
            if p.is_fixed:
                continue
            if p.choices is None:
                raise ConfigError(f"search.space.{p.name}: sampler grid needs a list of choices, not a range")
            if len(self.families) > 1 and "." in p.name and p.name.split(".", 1)[0] in self.families:
                raise ConfigError(f"search.space.{p.name}: sampler grid cannot search a family's fields "
                                  f"when several families are searched (they are conditional)")
            grid[p.name] = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in p.choices]
        return grid

    def points(self) -> int:
        """How many points grid() has."""
        n = 1
        for choices in self.grid().values():
            n *= len(choices)
        return n

    def size(self) -> int:
        """How many free dimensions the space has (0: nothing to search)."""
        free = sum(not p.is_fixed for ps in self.families.values() for p in ps)
        return free + (len(self.families) > 1) + sum(not p.is_fixed for p in self.keys)


def parse_space(spec: Any, run_sections: list[str]) -> Space:
    """The `search.space` mapping as a Space; every family and field is checked against the registry."""
    from ..train.config import method_fields
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("search.space: empty; declare at least one of method: {family: {field: choices}} or a "
                          "run-config key such as optimizer.lr: {low: 1e-4, high: 1e-2, log: true}")
    families: dict[str, list[Param]] = {}
    methods = spec.get("method", {})
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict):
        raise ConfigError("search.space.method: expected {family: {field: choices}} or a list of families")
    for family, fields in methods.items():
        try:
            known = method_fields(family)
        except ConfigError as err:
            raise ConfigError(f"search.space.method.{family}: {str(err).removeprefix('method.name: ')}") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"search.space.method.{family}: expected a mapping of its fields")
        for f in fields:
            if f not in known:
                from ..train.schema import suggest
                raise ConfigError(f"search.space.method.{family}.{f}: {family} has no field {f!r}"
                                  f"{suggest(f, list(known))}")
        families[family] = [parse_param(f"{family}.{f}", v) for f, v in fields.items()]
    keys = []
    for key, value in spec.items():
        if key == "method":
            continue
        if key.split(".")[0] not in run_sections:
            raise ConfigError(f"search.space.{key}: not a run-config key (sections: {', '.join(run_sections)})")
        keys.append(parse_param(key, value))
    space = Space(families, keys)
    if space.size() == 0:
        raise ConfigError("search.space: every dimension is fixed; nothing to search")
    return space
