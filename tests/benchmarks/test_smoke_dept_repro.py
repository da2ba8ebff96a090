"""benchmarks/dept_repro.py end to end (lr search on validation, 2 seeds, 2 steps, 10 fortunes per topic) and its verdicts."""
from __future__ import annotations

import pytest

from benchmarks import dept_repro
from benchmarks.dept_verdict import FAILS, HOLDS, MEAN_ONLY, NOISE, band, judge, paired, verdict

from ._helpers import check_png, load_json

QUANTITIES = {"step_seconds", "peak_train_mb", "inference_seconds", "test_accuracy"}
VERDICTS = {HOLDS, MEAN_ONLY, NOISE, FAILS}


def test_verdicts_from_per_seed_numbers():
    assert verdict([0.53, 0.25, 0.37], 0.20) == HOLDS  # every seed above 20%
    assert verdict([0.53, 0.15, 0.37, 0.40, 0.45], 0.20) == MEAN_ONLY  # mean 0.38, band 0.127: above it
    assert verdict([0.14, 0.24, 0.34], 0.20) == NOISE  # mean 0.24, band 2 * 0.1 / sqrt(3) = 0.115
    assert verdict([0.01, 0.05, 0.03, 0.02], 0.20) == FAILS
    assert verdict([0.0, 0.0], 0.0) == HOLDS  # accuracy "at least as good": ties count
    assert band([0.1]) == 0.0 and band([0.1, 0.3]) == pytest.approx(0.2)
    pt = [{"seed": 0, "x": 2.0}, {"seed": 1, "x": 4.0}]
    dp = [{"seed": 1, "x": 3.0}, {"seed": 0, "x": 1.0}]
    assert paired(pt, dp, "x", saving=True) == [0.25, 0.5] and paired(pt, dp, "x", saving=False) == [-1.0, -1.0]
    assert judge([0.25, 0.5], 0.2)["verdict"] == HOLDS


def test_choose_lr_reads_validation_only():
    search = [{"method": m, "lr": lr, "valid_accuracy": v, "test_accuracy": 1 - v}
              for m, lr, v in (("prompt_tuning", 0.01, 0.3), ("prompt_tuning", 0.1, 0.5), ("dept", 0.01, 0.6),
                               ("dept", 0.1, 0.6))]
    assert dept_repro.choose_lr(search) == {"prompt_tuning": 0.1, "dept": 0.01}  # tie: the smaller lr


@pytest.mark.slow
def test_dept_repro_writes_json_table_and_png(tmp_path):
    assert dept_repro.main(["--steps", "2", "--seeds", "0", "1", "--grid", "1e-2", "1e-1", "--max-per-category", "10",
                            "--out", str(tmp_path)]) == tmp_path / "dept_repro.json"
    payload = load_json(tmp_path / "dept_repro.json")
    assert set(payload) == {"claim", "setup", "runs", "summary", "wall_seconds", "versions"}
    setup = payload["setup"]
    assert setup["steps"] == 2 and setup["max_per_category"] == 10 and setup["lr_grid"] == [0.01, 0.1]
    assert sorted((r["method"], r["lr"]) for r in setup["search"]) == sorted(
        (m, lr) for m in ("prompt_tuning", "dept") for lr in (0.01, 0.1))
    assert setup["chosen_lr"] == dept_repro.choose_lr(setup["search"])
    assert all("test_accuracy" not in r for r in setup["search"])  # the search record holds no test figures
    assert [(r["method"], r["seed"], r["steps"]) for r in payload["runs"]] == [
        ("dept", 0, 2), ("prompt_tuning", 0, 2), ("dept", 1, 2), ("prompt_tuning", 1, 2)]
    for run in payload["runs"]:
        assert run["lr"] == setup["chosen_lr"][run["method"]]
        assert run["peak_train_mb"] is not None and run["peak_train_mb"] > 0 and run["step_seconds"] > 0
    summary = payload["summary"]
    for method in ("prompt_tuning", "dept"):
        assert QUANTITIES <= set(summary[method]) and len(summary[method]["test_accuracy"]["values"]) == 2
    assert summary["prompt_tuning"]["prompt_params"] == summary["dept"]["prompt_params"] == 38_400  # equal budgets
    assert set(summary["dept_saving"]) == QUANTITIES - {"test_accuracy"}
    for key, claim in summary["claims"].items():
        assert claim["verdict"] == verdict(claim["per_seed"], claim["threshold"]) in VERDICTS
        assert len(claim["per_seed"]) == 2, key
    assert "DePT saving" in (tmp_path / "dept_repro.md").read_text()
    check_png(tmp_path / "dept_repro.png")
