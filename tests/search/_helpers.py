"""Shared set-up of the search tests: a search config on the built-in mlp (sklearn digits) in tmp_path, and
the real study it leaves in its SQLite file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE = {"model": "mlp", "data": {"source": "digits"},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"}, "threads": 1, "batch_size": 32}


def write_config(tmp_path: Path, search: dict[str, Any], name: str = "study", **run: Any) -> Path:
    """CONFIG.yaml with the mlp run and `search` (output_dir defaults to tmp_path/out)."""
    search = {"output_dir": str(tmp_path / "out"), **search}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **run, "search": search}, sort_keys=False))
    return path


def load(tmp_path: Path, name: str = "study"):
    """The study the search left in tmp_path/out/study.db."""
    import optuna
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")


def budget_count(study) -> int:
    """COMPLETE + PRUNED + FAIL-with-error: the trials the budget counts once nothing runs."""
    return sum(t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and "error" in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out
