"""`unipeft compare` on the built-in mlp over sklearn digits: real grid study, real trainer runs."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from unipeft.cli import main

RUN = {"model": "mlp", "data": {"source": "digits"}, "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
       "threads": 1, "batch_size": 32, "max_steps": 40, "eval_every": 20}
METHODS = "lora,bitfit,full,prompt_tuning"  # prompt_tuning needs token embeddings: not for the mlp
GRID = "lr=3e-3,3e-2"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(RUN, sort_keys=False))
    return path


def _compare(path: Path, out: Path, methods: str = METHODS, *extra: str) -> int:
    return main(["compare", str(path), "--methods", methods, "--seeds", "2", "--grid", GRID, "--output", str(out),
                 "--quiet", *extra])


@pytest.mark.parametrize("args, message", [
    (["--methods", "lora,lorra"], "--methods: 'lorra' not registered; registered methods: "),
    (["--grid", "lr="], "--grid optimizer.lr: an empty grid"),
    (["--grid", "optimizer.lr=-1"], "optimizer.lr: expected a positive number, got -1"),
    (["--grid", "epochz=1,2"], "epochz"),
    (["--seeds", "0"], "--seeds: expected a positive integer"),
])
def test_bad_input_runs_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["compare", str(_config(tmp_path)), "--output", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()


def test_unregistered_method_lists_the_registered_ones(tmp_path, capsys):
    from unipeft.compare.plan import registered
    assert main(["compare", str(_config(tmp_path)), "--methods", "nope", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in registered()) and "full" in registered() and "lora" in registered()


@pytest.mark.slow
def test_compare_picks_on_validation_reports_test_and_resumes(tmp_path, capsys):
    path, out = _config(tmp_path), tmp_path / "out"
    assert _compare(path, out) == 0
    capsys.readouterr()
    summary = json.loads((out / "compare.json").read_text())
    runs = {p.name: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(runs) == 4 * 2 * 2  # methods x grid x seeds, the skipped method's runs with their error
    for r in runs.values():
        assert set(r) == {"run_info", "train_info", "meta_info"}
        assert {"created_at", "total_time", "experiment_name", "train_config", "peft_config", "error_msg"} <= set(r["run_info"])
        assert {"train_time", "file_size", "num_trainable_params", "num_total_params", "status", "metrics"} <= set(r["train_info"])
    # a method that does not apply is skipped with its reason, the others ran
    assert "prompt_tuning" in summary["methods"] and "skipped" in summary["methods"]["prompt_tuning"]
    assert "prompt_tuning:" in (out / "compare.md").read_text()
    bad = [r for n, r in runs.items() if n.startswith("prompt_tuning")]
    assert len(bad) == 4 and all(r["run_info"]["error_msg"] and r["train_info"]["status"] == "fail" for r in bad)
    # the chosen lr is the best mean validation accuracy over seeds, recomputed from the run files
    for method in ("lora", "bitfit", "full"):
        mine = [r for n, r in runs.items() if n.startswith(method + "-")]
        by_lr: dict[float, list] = {}
        for r in mine:
            lr = r["run_info"]["train_config"]["optimizer"]["lr"]
            by_lr.setdefault(lr, []).append({m["split"]: m for m in r["train_info"]["metrics"]})
        valid = {lr: statistics.fmean(x["valid"]["accuracy"] for x in v) for lr, v in by_lr.items()}
        best = max(valid, key=valid.get)
        m = summary["methods"][method]
        assert m["chosen"] == {"optimizer.lr": best} and m["seeds"] == 2
        assert m["test"][0] == pytest.approx(statistics.fmean(x["test"]["accuracy"] for x in by_lr[best]), abs=1e-12)
        assert m["peak_mib"] > 50
    # trainable counts: full trains the whole mlp, bitfit only biases (+ the head), lora in between
    t = {k: summary["methods"][k]["trainable_params"] for k in ("lora", "bitfit", "full")}
    assert t["bitfit"] < t["lora"] < t["full"] and summary["methods"]["full"]["trainable_fraction"] == 1.0
    # digits is learnt in 40 steps: every trained method is far above the untrained model
    base = summary["baseline"]["test"][0]
    assert base < 0.3 and all(summary["methods"][k]["test"][0] > base + 0.3 for k in t)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a rerun trains nothing and reports the same
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trial-*/summary.json")}
    assert len(stamps) == 12
    assert _compare(path, out) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("trial-*/summary.json")} == stamps
    again = json.loads((out / "compare.json").read_text())
    assert again["methods"] == summary["methods"]
    # another set of methods in the same folder is refused, nothing changed
    capsys.readouterr()
    assert _compare(path, out, "lora,full") == 2
    assert "--output:" in capsys.readouterr().err
    assert json.loads((out / "compare.json").read_text())["methods"] == summary["methods"]


def test_rows_that_need_targets_take_the_configs_and_the_others_keep_their_defaults():
    from unipeft.compare.plan import inherited_targets
    section = {"name": "lora", "r": 8, "target_modules": ["query", "value"]}
    assert [(p.name, p.fixed) for p in inherited_targets("vera", section)] == [("vera.target_modules", ["query", "value"])]
    assert [(p.name, p.fixed) for p in inherited_targets("ia3", section)] == [("ia3.target_modules", ["query", "value"])]
    for own in ("lora", "bitfit", "ln_tuning", "prompt_tuning", "full"):
        assert inherited_targets(own, section) == []
    assert inherited_targets("vera", {"name": "lora"}) == []
