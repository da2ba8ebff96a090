"""Run config: YAML sections, overrides, unknown keys with suggestions, type errors, groups and schedules."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from unipeft.core.errors import ConfigError
from unipeft.train import config_from_dict, load_config
from unipeft.train.config import build_method_config
from unipeft.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups

from ._helpers import write_config


def test_yaml_and_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", model="minilm", method={"name": "lora", "r": 8},
                        optimizer={"lr": 1e-3}, epochs=3)
    cfg = load_config(path, ["--method.r", "4", "--optimizer.lr=5e-4", "--data.categories", "[food, law]",
                             "--max_steps", "7", "--schedule.name", "cosine", "--model.name", "/some/folder"])
    assert cfg.method == {"name": "lora", "r": 4}
    assert cfg.optimizer.lr == 5e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.categories == ["food", "law"] and cfg.max_steps == 7 and cfg.epochs == 3.0
    assert cfg.schedule.name == "cosine" and cfg.model.name == "/some/folder"
    assert load_config(path).method == {"name": "lora", "r": 8}  # the file itself is unchanged
    # the saved config (config.yaml of a run) round-trips
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,message", [
    ({"optimzer": {"lr": 1.0}}, "unknown config key 'optimzer'; did you mean 'optimizer'?"),
    ({"data": {"max_lenght": 64}}, "unknown config key 'data.max_lenght'; did you mean 'data.max_length'?"),
    ({"method": {"name": "lora", "rr": 4}}, "unknown config key 'method.rr'; did you mean 'method.r'?"),
    ({"method": {"name": "lorra"}}, "method.name: unknown method 'lorra'; did you mean 'lora'?"),
    ({"schedule": {"name": "cosin"}}, "schedule.name: expected one of 'linear', 'cosine', 'constant', got 'cosin'; "
                                      "did you mean 'cosine'?"),
    ({"optimizer": {"groups": [{"params": "classifier", "lrr": 1.0}]}},
     "unknown config key 'optimizer.groups[0].lrr'; did you mean 'optimizer.groups[0].lr'?"),
])
def test_unknown_keys_suggest_the_nearest(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("data,message", [
    ({"epochs": "two"}, "epochs: expected float or null, got str 'two'"),
    ({"batch_size": 0}, "batch_size: expected a positive integer, got 0"),
    ({"batch_size": 2.5}, "batch_size: expected int, got float 2.5"),
    ({"data": {"split": "0.8"}}, "data.split: expected a list"),
    ({"method": {"name": "lora", "r": "eight"}}, "method.r: expected int"),
    ({"data": {"source": "digit"}}, "did you mean 'digits'?"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing: expected bool, got str 'yes'"),
    ({"schedule": {"warmup_ratio": 1.5}}, "schedule.warmup_ratio: expected 0 <= ratio < 1"),
    ({"method": {"r": 4}}, "method.name: required"),
    ([1, 2], "expected a mapping of sections"),
])
def test_type_and_range_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data)


def test_override_errors(tmp_path):
    path = write_config(tmp_path / "c.yaml", model="minilm")
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; did you mean 'epochs'"):
        load_config(path, ["--epoch", "1"])
    with pytest.raises(ConfigError, match="override --epochs: missing value"):
        load_config(path, ["--epochs"])
    with pytest.raises(ConfigError, match="expected --key value"):
        load_config(path, ["epochs", "1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [minilm\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML \(line 2"):
        load_config(tmp_path / "bad.yaml")


def test_every_registered_method_builds_or_names_its_fields():
    from unipeft.core.registry import public_methods

    for name, spec in public_methods().items():
        try:
            cfg = build_method_config({"name": name})
        except ConfigError as exc:  # a method may require fields; the error must name the method section
            assert "method" in str(exc) or name in str(exc).lower()  # the section or the method's config class
        else:
            assert isinstance(cfg, spec.config_cls)
    assert build_method_config({"name": "full", "trainable": ["^classifier"]}) == {"trainable": ["^classifier"]}
    lora = build_method_config({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query"]})
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 8, ["query"])


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.prompt = nn.Parameter(torch.zeros(3))


def test_param_groups_first_match_wins_and_method_groups_follow():
    cfg = config_from_dict({"optimizer": {"lr": 1e-3, "weight_decay": 0.1, "groups": [
        {"params": "^classifier", "lr": 3e-3}, {"params": "body|classifier", "lr_scale": 0.5, "weight_decay": 0.0}]}})
    groups = param_groups(_Toy(), cfg.optimizer, [{"params": "prompt", "lr": 0.3}, {"params": "nothing", "lr": 1}])
    got = {g["name"]: (sorted(p.shape[0] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups}
    assert got == {"^classifier": ([2, 2], 3e-3, 0.1), "body|classifier": ([4, 4], 5e-4, 0.0),
                   "prompt": ([3], 0.3, 0.1)}  # a method group matching nothing is skipped silently
    bad = config_from_dict({"optimizer": {"groups": [{"params": "^head"}]}})
    with pytest.raises(ConfigError, match=r"optimizer.groups\[0\].params='\^head' matches no trainable parameter"):
        param_groups(_Toy(), bad.optimizer)
    with pytest.raises(ConfigError, match="bad regex"):
        param_groups(_Toy(), config_from_dict({"optimizer": {"groups": [{"params": "(("}]}}).optimizer)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_schedules_with_warmup(name):
    cfg = config_from_dict({"schedule": {"name": name, "warmup_steps": 2},
                            "optimizer": {"lr": 1.0, "groups": [{"params": "^classifier", "lr": 10.0}]}})
    opt = build_optimizer(_Toy(), cfg.optimizer)
    sched = build_scheduler(opt, cfg.schedule, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [s[0] for s in seen[:3]] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up from 0
    assert all(s[1] == pytest.approx(10 * s[0]) for s in seen)  # groups keep their ratio
    expect = {"linear": 1 - 5 / 8, "cosine": 0.5 * (1 + math.cos(math.pi * 5 / 8)), "constant": 1.0}[name]
    assert seen[7][0] == pytest.approx(expect)
    assert lr_factor(name, 10, 2, 10) == pytest.approx({"linear": 0.0, "cosine": 0.0, "constant": 1.0}[name])
