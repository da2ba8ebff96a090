"""The search space and the `search:` section: what each YAML form becomes as an Optuna suggestion, and every
mistake failing with a ConfigError that names the field before any trial (or study) exists."""
from __future__ import annotations

import json
import math

import optuna
import pytest

from unipeft.cli import main
from unipeft.core.errors import ConfigError
from unipeft.search.config import load_search
from unipeft.search.space import parse_param

from ._helpers import write_config

SPACE = {
    "method": {
        "lora": {"r": [1, 2, 4, 8], "target_modules": [["fc1"], ["fc1", "fc2"]], "alpha": {"low": 4, "high": 32},
                 "dropout": 0.0},
        "ia3": {"target_modules": "all-linear"},
    },
    "optimizer.lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True},
    "optimizer.weight_decay": {"low": 0.0, "high": 0.1, "step": 0.05},
    "batch_size": [16, 32],
}


def test_param_forms():
    assert parse_param("r", [1, 2]).choices == [1, 2]
    assert parse_param("t", [["a"], ["a", "b"]]).choices == [["a"], ["a", "b"]]
    p = parse_param("lr", {"low": 1e-4, "high": 1e-1, "log": True})
    assert (p.low, p.high, p.log, p.choices, p.is_fixed) == (1e-4, 1e-1, True, None, False)
    fixed = parse_param("dropout", 0.0)
    assert fixed.is_fixed and fixed.fixed == 0.0


def test_space_samples_conditional_families(tmp_path):
    plan = load_search(write_config(tmp_path, {"trials": 2, "space": SPACE, "sampler": "random"}))
    assert sorted(plan.space.families) == ["ia3", "lora"]
    # method (2 families), lora.r, lora.target_modules, lora.alpha, lr, weight_decay, batch_size; fixed ones not
    assert plan.space.size() == 7
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'space.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {"lora": 0, "ia3": 0}
    for _ in range(30):
        trial = study.ask()
        method, overrides = plan.space.sample(trial)
        keys = dict(overrides)
        seen[method["name"]] += 1
        if method["name"] == "lora":
            assert set(method) == {"name", "r", "target_modules", "alpha", "dropout"}
            assert method["r"] in (1, 2, 4, 8) and method["dropout"] == 0.0
            assert method["target_modules"] in (["fc1"], ["fc1", "fc2"])  # a list, not its JSON text
            assert isinstance(method["alpha"], int) and 4 <= method["alpha"] <= 32
            assert json.loads(trial.params["lora.target_modules"]) == method["target_modules"]
            assert "ia3.target_modules" not in trial.params  # fixed, and of the other family
        else:
            assert method == {"name": "ia3", "target_modules": "all-linear"}
            assert not any(k.startswith("lora.") for k in trial.params)
        assert 1e-4 <= keys["optimizer.lr"] <= 1e-1
        assert min(abs(keys["optimizer.weight_decay"] - v) for v in (0.0, 0.05, 0.1)) < 1e-9
        assert keys["batch_size"] in (16, 32)
        cfg = plan.trial_config(method, overrides, str(tmp_path / "t"))  # a valid run config on the mlp
        assert cfg.method_name == method["name"] and cfg.optimizer.lr == keys["optimizer.lr"]
        study.tell(trial, 0.0)
    assert seen["lora"] >= 5 and seen["ia3"] >= 5
    # the log range is sampled in log space: about half the draws below the geometric middle 3.2e-3
    lrs = [t.params["optimizer.lr"] for t in study.trials]
    below = sum(lr < math.sqrt(1e-4 * 1e-1) for lr in lrs)
    assert 6 <= below <= 24


BAD = [
    ({"space": {}}, "search.space: empty"),
    ({"space": {"optimizer.lr": 0.01, "method": {"lora": {"r": 4}}}}, "search.space: every dimension is fixed"),
    ({"space": {"method": {"lorra": {"r": [2, 4]}}}}, "search.space.method.lorra: unknown method 'lorra'"),
    ({"space": {"method": {"lora": {"rank": [2, 4]}}}}, "search.space.method.lora.rank: lora has no field 'rank'"),
    ({"space": {"method": {"lora": {"r": []}}}}, "search.space.lora.r: an empty list of choices"),
    ({"space": {"optimizer.lr": {"low": 0.1, "high": 0.01}}}, "search.space.optimizer.lr: low 0.1 is above high 0.01"),
    ({"space": {"optimizer.lr": {"low": 0.0, "high": 0.1, "log": True}}},
     "search.space.optimizer.lr: a log range needs low > 0, got 0.0"),
    ({"space": {"optimiser.lr": [0.1, 0.01]}}, "search.space.optimiser.lr: not a run-config key"),
    ({"objectives": ["valid_bleu", "trainable_params"]},
     "search.objectives: 'valid_bleu' is never reported for task classification"),
    ({"sampler": "tpe"}, "search.sampler: tpe is single-objective"),
    ({"sampler": "annealing"}, "search.sampler: expected one of nsga2, motpe, tpe, gp, random, grid, got 'annealing'"),
    ({"pruner": {"name": "hyperband"}}, "search.pruner.name: expected one of none, median, percentile"),
]


@pytest.mark.parametrize("search,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_search_fails_before_any_trial(tmp_path, capsys, search, message):
    search = {"trials": 2, "space": {"optimizer.lr": [0.01, 0.1]}, **search}
    path = write_config(tmp_path, search)
    with pytest.raises(ConfigError) as err:
        load_search(path)
    assert message in str(err.value)
    assert main(["search", str(path), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no study.db, no trial folder


def test_unopenable_storage_names_the_flag(tmp_path, capsys):
    path = write_config(tmp_path, {"trials": 2, "space": {"optimizer.lr": [0.01, 0.1]}})
    code = main(["search", str(path), "--quiet", "--storage", "sqlite:////nonexistent/dir/x.db"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--storage: cannot open 'sqlite:////nonexistent/dir/x.db'" in err
    assert not (tmp_path / "out").exists()


def test_show_of_a_missing_study_runs_nothing(tmp_path, capsys):
    path = write_config(tmp_path, {"trials": 2, "space": {"optimizer.lr": [0.01, 0.1]}})
    assert main(["search", str(path), "--show", "--study", "absent"]) == 2
    assert "--show: no study database" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # --show creates no empty study.db
    url = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["search", str(path), "--show", "--study", "absent", "--storage", url]) == 2
    assert "--study: no study 'absent'" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("trial-*"))


def test_grid_sampler_needs_lists_and_a_budget_within_the_grid(tmp_path, capsys):
    from unipeft.search.config import load_search
    path = write_config(tmp_path, {"trials": 4, "sampler": "grid", "space": {"optimizer.lr": [0.01, 0.1],
                                                                               "seed": [0, 1]}})
    plan = load_search(path)
    assert plan.space.grid() == {"optimizer.lr": [0.01, 0.1], "seed": [0, 1]}
    path = write_config(tmp_path, {"trials": 5, "sampler": "grid", "space": {"optimizer.lr": [0.01, 0.1],
                                                                               "seed": [0, 1]}})
    assert main(["search", str(path), "--quiet"]) == 2
    assert "search.trials: 5 trials but the grid has 4 points" in capsys.readouterr().err
    path = write_config(tmp_path, {"trials": 2, "sampler": "grid", "space": {"optimizer.lr": {"low": 0.01, "high": 0.1}}})
    assert main(["search", str(path), "--quiet"]) == 2
    assert "search.space.optimizer.lr: sampler grid needs a list of choices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
