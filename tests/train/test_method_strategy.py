"""The `method` section is built once per RunConfig into a typed config + strategy; 'full' is one strategy object."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import unipeft.train.config as config_mod
from unipeft.core.config import AdapterConfig
from unipeft.core.errors import ConfigError
from unipeft.train import build_method_config, config_from_dict
from unipeft.train.full import FullFineTuneConfig
from unipeft.train.strategy import AdapterStrategy

TRAIN_SRC = Path(config_mod.__file__).parent


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)


@pytest.fixture
def build_calls(monkeypatch):
    """Count the calls of the one method builder (RunConfig.validate looks it up in its module)."""
    calls = []
    real = config_mod.build_method_config

    def counting(method):
        calls.append(dict(method))
        return real(method)

    monkeypatch.setattr(config_mod, "build_method_config", counting)
    return calls


def test_method_is_built_once_and_kept(build_calls):
    cfg = config_from_dict({"method": {"name": "lora", "r": 4, "target_modules": ["query"]}})
    assert len(build_calls) == 1
    first = cfg.method_config
    assert isinstance(first, AdapterConfig) and first.r == 4
    assert cfg.method_config is first and cfg.strategy is cfg.strategy  # no rebuild on access
    assert isinstance(cfg.strategy, AdapterStrategy) and cfg.strategy.config is first
    assert len(build_calls) == 1
    # The built object stays out of the dataclass machinery: config.yaml and == see only the dict.
    assert cfg.to_dict()["method"] == {"name": "lora", "r": 4, "target_modules": ["query"]}
    assert "method_config" not in cfg.to_dict() and "_strategy" not in cfg.to_dict()
    assert [f.name for f in dataclasses.fields(cfg)] == list(cfg.to_dict())
    assert config_from_dict(cfg.to_dict()) == cfg and len(build_calls) == 2  # a new RunConfig: built again
    assert "_strategy" not in repr(cfg)


def test_a_whole_full_run_builds_its_method_once(build_calls, tmp_path):
    from unipeft.train.artifacts import load_run
    from unipeft.train.run import train_run

    cfg = config_from_dict({"model": "mlp", "data": {"source": "digits"}, "output_dir": str(tmp_path / "run"),
                            "method": {"name": "full", "trainable": ["^classifier\\."]}, "threads": 1,
                            "max_steps": 2, "batch_size": 32, "log_every": 1})
    s = train_run(cfg, show_progress=False, log=lambda *a: None)
    assert len(build_calls) == 1  # setup, saving and the summary all used cfg's own strategy
    assert s["method"] == "full" and s["trainable_params"] == 64 * 10 + 10
    assert (tmp_path / "run" / "trainable.safetensors").is_file() and not (tmp_path / "run" / "adapter").exists()
    run = load_run(tmp_path / "run")
    assert len(build_calls) == 2  # the reloaded run's config, once
    assert isinstance(run.cfg.method_config, FullFineTuneConfig)
    assert sorted(n for n, p in run.model.named_parameters() if p.requires_grad) == ["classifier.bias",
                                                                                     "classifier.weight"]


def test_full_config_trains_only_matching_parameters():
    cfg = config_from_dict({"method": {"name": "full", "trainable": ["^classifier\\."]}})
    full = cfg.method_config
    assert isinstance(full, FullFineTuneConfig) and full.trainable == ["^classifier\\."]
    assert cfg.strategy is full  # 'full' is its own strategy
    toy = _Toy()
    assert full.apply(toy) is toy
    assert {n: p.requires_grad for n, p in toy.named_parameters()} == {
        "body.weight": False, "body.bias": False, "classifier.weight": True, "classifier.bias": True}
    everything = _Toy()
    config_from_dict({"method": "full"}).strategy.apply(everything)  # no `trainable`: all of them
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(ConfigError, match=re.escape("method.trainable=['^head'] matches no parameter of _Toy")):
        FullFineTuneConfig(trainable=["^head"]).apply(_Toy())


def test_full_weights_round_trip(tmp_path):
    full = FullFineTuneConfig(trainable=["^classifier\\."])
    trained = full.apply(_Toy())
    with torch.no_grad():
        trained.classifier.weight.fill_(0.5)
    full.save(trained, tmp_path)
    loaded = full.load(_Toy(), tmp_path)
    torch.testing.assert_close(loaded.classifier.weight, torch.full((2, 4), 0.5))


def test_full_config_fields_and_bad_values():
    assert config_mod.method_fields("full") == {"trainable": list[str] | None}
    assert build_method_config({"name": "full"}) == FullFineTuneConfig()
    with pytest.raises(ConfigError, match=re.escape("method.trainable: expected list[str] or null, got str")):
        config_from_dict({"method": {"name": "full", "trainable": "^classifier"}})
    with pytest.raises(ConfigError, match="unknown config key 'method.trainabel'; did you mean 'method.trainable'"):
        config_from_dict({"method": {"name": "full", "trainabel": ["x"]}})


def test_info_lists_full_from_its_strategy(capsys):
    from unipeft.cli import main

    assert main(["info", "--methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == FullFineTuneConfig.info_line() == "full: trainable (regexes of parameter names; default: all)"


def test_no_method_name_branches_remain_in_train():
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(TRAIN_SRC.glob("*.py"))}
    branch = re.compile(r"""(==|!=)\s*(FULL\b|["']full["'])|(FULL|["']full["'])\s*(==|!=)|method_name\s*(==|!=)""")
    offenders = {name: m.group(0) for name, text in sources.items() if (m := branch.search(text))}
    assert offenders == {}
    # build_method_config: defined and called once in config.py (RunConfig.validate), called nowhere else
    calls = {name: len(re.findall(r"\bbuild_method_config\(", text)) for name, text in sources.items()}
    assert calls.pop("config.py") == 2 and not any(calls.values())
