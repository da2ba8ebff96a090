"""Searches run end to end through `unipeft search` on the mlp: the study in its SQLite file, the Pareto
report and front configs, pruning of trials that cannot learn, and failing trials that do not stop the study."""
from __future__ import annotations

import json

import pytest
import yaml

from unipeft.cli import main
from unipeft.train.config import load_config
from unipeft.train.run import train_run

from ._helpers import budget_count, load, states, write_config

BUDGET = {"max_steps": 30, "eval_every": 10}


def _dominates(a, b, directions):
    better = [x > y if d == "maximize" else x < y for x, y, d in zip(a, b, directions)]
    worse = [x < y if d == "maximize" else x > y for x, y, d in zip(a, b, directions)]
    return any(better) and not any(worse)


@pytest.mark.slow
def test_search_writes_a_non_dominated_front_of_runnable_configs(tmp_path, capsys):
    space = {"method": {"lora": {"r": [1, 2, 4, 8]}, "ia3": {"target_modules": "all-linear"}},
             "optimizer.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}}
    path = write_config(tmp_path, {"trials": 6, "sampler": "nsga2", "budget": BUDGET, "space": space,
                                   "pruner": {"name": "median", "startup_trials": 2, "warmup_steps": 10}})
    assert main(["search", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    study = load(tmp_path)
    assert budget_count(study) == 6 and set(states(study)) <= {"COMPLETE", "PRUNED"}
    # a finished trial keeps its run folder; a pruned run leaves none (train_run drops an unfinished run)
    done = [t.number for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 2 and sorted(p.name for p in out.glob("trial-*")) == [f"trial-{i:04d}" for i in done]
    for name in ("pareto.md", "pareto.png", "pareto.json"):
        assert (out / name).stat().st_size > 100
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    payload = json.loads((out / "pareto.json").read_text())
    assert payload["objectives"] == ["valid_accuracy", "trainable_params"]
    assert payload["directions"] == ["maximize", "minimize"]
    rows = {r["trial"]: r for r in payload["trials"]}
    complete = {n: (r["valid_accuracy"], r["trainable_params"]) for n, r in rows.items() if r["state"] == "COMPLETE"}
    front = payload["front"]
    assert front and set(front) <= set(complete)
    for f in front:  # nobody dominates a front member, and every other trial is dominated by one
        assert not any(_dominates(v, complete[f], payload["directions"]) for v in complete.values())
    for n, v in complete.items():
        if n not in front:
            assert any(_dominates(complete[f], v, payload["directions"]) for f in front)
    for n, r in rows.items():  # values agree with the study and the runs' own summaries
        t = study.trials[n]
        assert r["trainable_params"] == t.user_attrs["trainable_params"]
        if r["state"] == "COMPLETE":
            summary = json.loads((out / f"trial-{n:04d}" / "summary.json").read_text())
            assert r["valid_accuracy"] == pytest.approx(summary["valid"]["accuracy"])
            assert r["trainable_params"] == summary["trainable_params"]
    md = (out / "pareto.md").read_text()
    assert md == printed.split("wrote ")[0].rstrip("\n") + "\n"
    for f in front:
        assert f"| {f} | {rows[f]['valid_accuracy']:.4g} | {rows[f]['trainable_params']:.4g} |" in md

    assert sorted(p.name for p in (out / "front").iterdir()) == [f"trial-{f:04d}.yaml" for f in front]
    for f in front:  # each front member is a run config `unipeft train` accepts and trains
        fpath = out / "front" / f"trial-{f:04d}.yaml"
        data = yaml.safe_load(fpath.read_text())
        assert data["method"]["name"] == ("lora" if "lora.r" in rows[f]["params"] else "ia3")
        assert data["optimizer"]["lr"] == pytest.approx(rows[f]["params"]["optimizer.lr"])
        cfg = load_config(fpath, ["--max_steps", "3", "--output_dir", str(tmp_path / f"retrain-{f}")])
        summary = train_run(cfg, overwrite=True, show_progress=False, log=lambda *_: None)
        assert summary["steps"] == 3 and summary["trainable_params"] == rows[f]["trainable_params"]

    # --show: the same front from the study, no trial run
    (out / "pareto.json").unlink()
    assert main(["search", str(path), "--show"]) == 0
    assert json.loads((out / "pareto.json").read_text())["front"] == front
    assert len(load(tmp_path).trials) == 6


@pytest.mark.slow
def test_median_pruner_stops_trials_that_cannot_learn(tmp_path):
    path = write_config(tmp_path, {"trials": 8, "sampler": "random", "seed": 3,
                                   "budget": {"max_steps": 60, "eval_every": 10},
                                   "space": {"optimizer.lr": {"low": 1.0e-5, "high": 1.0e-1, "log": True}},
                                   "pruner": {"name": "median", "startup_trials": 2, "warmup_steps": 10}})
    assert main(["search", str(path), "--quiet"]) == 0
    study = load(tmp_path)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert budget_count(study) == 8 and len(pruned) >= 1
    for t in pruned:
        steps = [int(s) for s in t.user_attrs["intermediate"]]
        assert sorted(steps) == list(range(10, max(steps) + 1, 10))  # evaluated every 10 steps until pruned
        assert max(steps) < 60 and t.user_attrs["pruned_at"].startswith(f"step {max(steps)}:")
        assert not (tmp_path / "out" / f"trial-{t.number:04d}" / "summary.json").exists()
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert sorted(int(s) for s in t.user_attrs["intermediate"]) == [10, 20, 30, 40, 50, 60]
    # what was pruned was worse than the median of the finished trials at its step
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    for t in pruned:
        step = str(max(int(s) for s in t.user_attrs["intermediate"]))
        others = sorted(d.user_attrs["intermediate"][step] for d in done if d.number < t.number)
        assert t.user_attrs["intermediate"][step] <= others[len(others) // 2]


@pytest.mark.slow
def test_without_pruner_every_trial_runs_to_the_end(tmp_path):
    path = write_config(tmp_path, {"trials": 4, "sampler": "random", "seed": 3,
                                   "budget": {"max_steps": 30, "eval_every": 10}, "pruner": "none",
                                   "space": {"optimizer.lr": {"low": 1.0e-5, "high": 1.0e-1, "log": True}}})
    assert main(["search", str(path), "--quiet"]) == 0
    study = load(tmp_path)
    assert states(study) == {"COMPLETE": 4}
    lrs = sorted(t.params["optimizer.lr"] for t in study.trials)
    assert lrs[0] < 1e-3 < lrs[-1]  # the range that could be pruned was sampled
    for t in study.trials:
        assert sorted(int(s) for s in t.user_attrs["intermediate"]) == [10, 20, 30]


def test_a_failing_trial_is_recorded_and_counted(tmp_path, capsys):
    # r = 0 passes the space check (a choice like any other) but LoraConfig rejects it when the trial is built
    path = write_config(tmp_path, {"trials": 5, "sampler": "random", "seed": 0, "pruner": "none",
                                   "budget": {"max_steps": 10, "eval_every": 10},
                                   "space": {"method": {"lora": {"r": [0, 2]}}, "optimizer.lr": [0.01, 0.05]}})
    assert main(["search", str(path), "--quiet"]) == 0
    study = load(tmp_path)
    assert len(study.trials) == 5 and budget_count(study) == 5
    failed = [t for t in study.trials if t.params["lora.r"] == 0]
    assert 1 <= len(failed) <= 4
    for t in study.trials:
        if t.params["lora.r"] == 0:
            assert t.state.name == "FAIL"
            assert t.user_attrs["error"] == "ConfigError: LoraConfig.r: rank must be a positive integer, got 0"
            assert not (tmp_path / "out" / f"trial-{t.number:04d}").exists()
        else:
            assert t.state.name == "COMPLETE" and t.values[1] == t.user_attrs["trainable_params"] > 0
    md = (tmp_path / "out" / "pareto.md").read_text()
    assert f"{len(failed)} fail" in md and "rank must be a positive integer, got 0" in md
    payload = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert not set(payload["front"]) & {t.number for t in failed}


def test_grid_search_over_every_point_with_peak_memory_as_an_objective(tmp_path):
    path = write_config(tmp_path, {"trials": 4, "sampler": "grid", "pruner": "none", "budget": BUDGET,
                                   "objectives": ["valid_accuracy", "peak_mib"],
                                   "space": {"method": {"lora": {"r": [1, 8]}}, "optimizer.lr": [0.01, 0.03]}})
    assert main(["search", str(path), "--quiet"]) == 0
    study = load(tmp_path)
    assert states(study) == {"COMPLETE": 4}
    assert sorted((t.params["lora.r"], t.params["optimizer.lr"]) for t in study.trials) == [
        (1, 0.01), (1, 0.03), (8, 0.01), (8, 0.03)]  # every grid point once
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        # the process holds torch and the mlp: a resident peak of at least 50 MiB, as the trial recorded it
        assert t.values[1] == t.user_attrs["peak_mib"] > 50
