"""The federated YAML: defaults resolve to a run config; bad fields fail naming the field, before any run."""
import pytest
import yaml

from unipeft.core.errors import ConfigError
from unipeft.federated import federated_config_from_dict, load_federated_config

RUN = {"model": "mlp", "data": {"source": "digits"}, "method": {"name": "lora", "r": 4, "target_modules": "all-linear"}}


def test_strategies_shape_the_run_config():
    ffa = federated_config_from_dict({"train": RUN, "strategy": "ffa_lora", "local_steps": 4})
    assert ffa.run.method["name"] == "lora_fa" and ffa.run.method["lorafa_projection"] is False
    assert ffa.run.max_steps == 4 and ffa.run.save_every is None
    zo = federated_config_from_dict({"train": RUN, "strategy": {"name": "fedkseed", "seeds": 64}})
    assert zo.run.optimizer.name == "mezo" and zo.strategy.seeds == 64


def test_file_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN))
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump({"train": "run.yaml", "clients": 4, "min_clients": 2}))
    fed = load_federated_config(tmp_path / "fed.yaml", ["--rounds", "2", "--strategy.name", "lora_fair",
                                                         "--train.optimizer.lr", "0.02", "--partition.alpha", "0.1"])
    assert (fed.rounds, fed.strategy.name, fed.partition.alpha, fed.run.optimizer.lr) == (2, "lora_fair", 0.1, 0.02)
    assert fed.to_dict()["train"]["optimizer"]["lr"] == 0.02


@pytest.mark.parametrize("data,field", [
    ({"strategy": "fedprox"}, "strategy.name"),
    ({"strategy": "lora_fair", "train": {**RUN, "method": {"name": "ia3"}}}, "strategy.name"),
    ({"clients": 2, "min_clients": 3}, "min_clients"),
    ({"fraction": 0.0}, "fraction"),
    ({"rounds": 0}, "rounds"),
    ({"train": "missing.yaml"}, "train"),
    ({"train": {**RUN, "optimizer": {"lr": -1}}}, "optimizer.lr"),
    ({"max_update_bytes": 0}, "max_update_bytes"),
    ({"colour": 1}, "colour"),
])
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        federated_config_from_dict({"train": RUN, **data})


def test_local_epochs_win_over_steps_and_are_checked():
    fed = federated_config_from_dict({"train": RUN, "local_epochs": 0.5, "rounds": 4})
    assert fed.schedule_unit == 1 and fed.local_epochs == 0.5
    with pytest.raises(ConfigError, match="local_epochs"):
        federated_config_from_dict({"train": RUN, "local_epochs": 0})
