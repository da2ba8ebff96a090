"""benchmarks/dept_repro.py end to end: both methods, 1 seed, 2 steps, 10 fortunes per topic (child processes)."""
from __future__ import annotations

import pytest

from benchmarks import dept_repro

from ._helpers import check_png, load_json

QUANTITIES = {"step_seconds", "peak_train_mb", "inference_seconds", "test_accuracy"}


@pytest.mark.slow
def test_dept_repro_writes_json_table_and_png(tmp_path):
    assert dept_repro.main(["--steps", "2", "--seeds", "0", "--max-per-category", "10", "--out", str(tmp_path)]) \
        == tmp_path / "dept_repro.json"
    payload = load_json(tmp_path / "dept_repro.json")
    assert set(payload) == {"claim", "setup", "runs", "summary", "wall_seconds", "versions"}
    assert payload["setup"]["steps"] == 2 and payload["setup"]["max_per_category"] == 10
    assert [(r["method"], r["seed"], r["steps"]) for r in payload["runs"]] == [("prompt_tuning", 0, 2), ("dept", 0, 2)]
    for run in payload["runs"]:
        assert run["peak_train_mb"] > 0 and run["step_seconds"] > 0  # the probe measured something
    summary = payload["summary"]
    for method in ("prompt_tuning", "dept"):
        assert QUANTITIES <= set(summary[method]) and len(summary[method]["test_accuracy"]["values"]) == 1
    assert summary["prompt_tuning"]["prompt_params"] == summary["dept"]["prompt_params"] == 38_400  # equal budgets
    assert set(summary["dept_saving"]) == QUANTITIES - {"test_accuracy"}
    assert "DePT saving" in (tmp_path / "dept_repro.md").read_text()
    check_png(tmp_path / "dept_repro.png")
