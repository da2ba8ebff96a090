"""A comparison as a grid study of the search runner: methods x learning rates (x other keys) x seeds.

`unipeft compare CONFIG.yaml --methods lora,ia3,full --seeds 3 --grid lr=1e-4,3e-4,1e-3` builds a SearchPlan
whose space is the categorical grid {method, optimizer.lr, ..., seed} and whose sampler is Optuna's
GridSampler: the same runner as `unipeft search` schedules, resumes and parallelises it (every grid point
is one trial; a rerun skips the finished ones).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..search.config import METRICS, SearchConfig, SearchPlan
from ..search.space import Param, Space
from ..train.config import apply_overrides, config_from_dict, parse_overrides
from ..train.schema import parse_yaml, set_dotted

ALIASES = {"lr": "optimizer.lr"}
DEFAULT_METHODS = "lora,ia3,bitfit,full"
DEFAULT_GRID = "lr=3e-4,1e-3,3e-3"


def registered() -> list[str]:
    from ..core.registry import public_methods
    from ..train.strategy import BUILT_IN_METHODS
    return sorted(public_methods()) + sorted(BUILT_IN_METHODS)


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError("--methods: empty; e.g. --methods lora,ia3,full")
    known = registered()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(map(repr, unknown))} not registered; registered methods: "
                          f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods: a method listed twice in {names}")
    return names


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """{dotted run-config key: values} from `key=v1,v2` items (`lr` is optimizer.lr)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not eq or not key:
            raise ConfigError(f"--grid {item!r}: expected key=value1,value2 (e.g. lr=1e-4,3e-4,1e-3)")
        parsed = [parse_overrides([f"--{key}", v.strip()])[0][1] for v in values.split(",") if v.strip()]
        if not parsed:
            raise ConfigError(f"--grid {key}: an empty grid; give at least one value (e.g. {key}=1e-3)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        if key in ("seed", "method") or key.startswith("method."):
            raise ConfigError(f"--grid {key}: set by compare itself (--seeds, --methods)")
        grid[key] = parsed
    return grid


def load_compare(config: str | Path, methods: list[str], grid: dict[str, list[Any]], seeds: int,
                 output: str | None, overrides: list[str]) -> SearchPlan:
    """The comparison's SearchPlan; the run config and every grid key are checked before any run."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if seeds < 1:
        raise ConfigError(f"--seeds: expected a positive integer, got {seeds}")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, task, data, method, ...)")
    data = {k: v for k, v in data.items() if k != "search"}
    data = apply_overrides(data, parse_overrides(overrides))
    base = config_from_dict(data, str(path))
    for key, values in grid.items():  # each value must make a valid run config
        for v in values:
            trial = json.loads(json.dumps(data))
            set_dotted(trial, key, v)
            config_from_dict(trial, f"--grid {key}={v}")
    out = output or f"runs/compare-{path.stem}"
    quality = f"valid_{METRICS[base.task][0]}"
    keys = [Param(k, choices=list(v)) for k, v in grid.items()] + [Param("seed", choices=list(range(seeds)))]
    space = Space({m: inherited_targets(m, data.get("method")) for m in methods}, keys)
    search = SearchConfig(trials=space.points(), objectives=[quality, "trainable_params"], sampler="grid", seed=0,
                          output_dir=out)
    search.pruner.name = "none"
    return SearchPlan(data, search, space, str(path))


def inherited_targets(name: str, section: Any) -> list[Param]:
    """A method that needs `target_modules` (no default targets of its own) takes the config method's, so
    those rows adapt the same modules; methods with their own defaults (biases, norms, embeddings) keep
    them, and the config's own method keeps its whole section."""
    import dataclasses

    from ..core.registry import public_methods
    section = {"name": section} if isinstance(section, str) else dict(section or {})
    targets, spec = section.get("target_modules"), public_methods().get(name)
    if name == section.get("name") or targets is None or spec is None or spec.default_targets is not None:
        return []
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    if "target_modules" not in fields or fields["target_modules"].default is not None:
        return []
    return [Param(f"{name}.target_modules", fixed=targets, is_fixed=True)]


def study_key(plan: SearchPlan) -> str:
    """What the comparison is: a rerun with other methods, grid or seeds is another comparison."""
    return json.dumps({"grid": plan.space.grid(), "methods": list(plan.space.families)}, sort_keys=True)


def study_name(plan: SearchPlan) -> str:
    return "compare-" + hashlib.sha1(study_key(plan).encode()).hexdigest()[:8]


def check_output(plan: SearchPlan) -> None:
    """One comparison per output folder: another grid there would mix trial folders."""
    marker = Path(plan.search.output_dir) / "compare.key"
    if marker.is_file() and marker.read_text() != study_key(plan):
        raise ConfigError(f"--output: {plan.search.output_dir} holds a comparison of other methods, grid or "
                          f"seeds ({json.loads(marker.read_text())['methods']}); use another --output")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(study_key(plan))
