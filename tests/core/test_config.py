"""AdapterConfig JSON: round trips, forward-compatible unknown keys, refused PEFT-only fields."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

import unipeft as up
from unipeft.core.config import CONFIG_NAME

from ..invariants.cases import CASES, build_model, calibration_batches, loading, make_batch, make_config, run

NON_DEFAULT = {
    "lora": {"r": 3, "alpha": 5.0, "dropout": 0.125, "use_rslora": True, "init": "gaussian",
             "rank_pattern": {"fc1": 4}, "alpha_pattern": {"fc2": 7.0}},
    "ia3": {"feedforward_modules": ["fc2"], "init_ia3_weights": False},
    "cpt": {"task_type": "CAUSAL_LM"},  # PEFT refuses CPT for any other task
    "adaption_prompt": {"target_modules": None},  # PEFT's target_modules there name the attention modules
    "xlora": {"adapters": {"0": "experts/0", "1": "experts/1"}, "hidden_size": 8},  # folders are read at adapt
}


def _config(method: str) -> up.AdapterConfig:
    spec = up.get_method(method)
    kwargs = {"target_modules": ["norm"] if method == "ln_tuning" else ["fc1", "fc2"],
              "exclude_modules": ["nothing"], "base_model_name_or_path": "toy/mlp", "task_type": "FEATURE_EXTRACTION",
              }
    kwargs.update(NON_DEFAULT.get(method, {}))
    return spec.config_cls(**kwargs)


@pytest.mark.parametrize("method", sorted(up.public_methods()))
def test_json_round_trip(method, tmp_path):
    cfg = _config(method)
    path = cfg.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["peft_type"] == cfg.peft_type
    assert data["target_modules"] == cfg.target_modules
    loaded = up.AdapterConfig.load(tmp_path)
    assert type(loaded) is type(cfg)
    assert loaded == cfg
    assert loaded.to_dict() == data


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_config_round_trip_through_save_and_from_pretrained(case, tmp_path):
    kind = "mlp" if not case.needs_head else "bert"
    model = build_model(kind)
    cfg = make_config(case, kind)
    adapted = up.adapt(model, cfg, calibration=calibration_batches(case, kind))
    adapted.save_pretrained(tmp_path)
    with loading(case, kind):
        loaded = up.AdaptedModel.from_pretrained(build_model(kind), tmp_path, is_trainable=True)
    got = loaded.peft_config["default"]
    assert type(got) is type(cfg)
    assert dataclasses.asdict(got) == dataclasses.asdict(adapted.peft_config["default"])
    with loading(case, kind):
        not_trainable = up.AdaptedModel.from_pretrained(build_model(kind), tmp_path)
    assert not_trainable.peft_config["default"].inference_mode is True
    batch = make_batch(kind)
    assert run(loaded, batch).shape == run(adapted, batch).shape


def test_lora_uses_peft_key_names(tmp_path):
    data = json.loads(_config("lora").save(tmp_path).read_text())
    assert data["lora_alpha"] == 5.0 and data["lora_dropout"] == 0.125 and data["init_lora_weights"] == "gaussian"
    assert not {"alpha", "dropout", "init"} & set(data)
    data = up.LoraConfig(target_modules=["fc1"]).to_dict()
    assert data["init_lora_weights"] is True


def _write(tmp_path, data):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("empty", [None, "", [], {}, False])
def test_unknown_key_with_empty_value_warns_and_is_dropped(tmp_path, empty):
    data = {**up.LoraConfig(target_modules=["fc1"], r=3).to_dict(), "some_future_key": empty}
    with pytest.warns(UserWarning, match="unknown config key 'some_future_key' ignored"):
        cfg = up.AdapterConfig.load(_write(tmp_path, data))
    assert isinstance(cfg, up.LoraConfig) and cfg.r == 3 and cfg.target_modules == ["fc1"]
    assert not hasattr(cfg, "some_future_key")
    assert "some_future_key" not in cfg.to_dict()


def test_unknown_key_with_a_value_raises_config_error(tmp_path):
    data = {**up.LoraConfig(target_modules=["fc1"]).to_dict(), "some_future_key": 4}
    with pytest.raises(up.ConfigError, match="'some_future_key'=4"):
        up.AdapterConfig.load(_write(tmp_path, data))


@pytest.mark.parametrize("key, value", [("use_qalora", True), ("lora_bias", True), ("layer_replication", [[0, 1]]),
                                        ("loftq_config", {"loftq_bits": 4}),
                                        ("trainable_token_indices", [1, 2])])
def test_peft_only_field_with_non_default_value_raises_naming_it(tmp_path, key, value):
    data = {**up.LoraConfig(target_modules=["fc1"]).to_dict(), key: value}
    with pytest.raises(up.ConfigError, match=rf"field '{key}'=.*not supported"):
        up.AdapterConfig.load(_write(tmp_path, data))


def test_peft_only_fields_with_default_values_load_silently(tmp_path):
    inert = up.LoraConfig.peft_inert
    data = {**up.LoraConfig(target_modules=["fc1"]).to_dict(), **inert, "revision": "main", "peft_version": "0.21.2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = up.AdapterConfig.load(_write(tmp_path, data))
    assert cfg == up.LoraConfig(target_modules=["fc1"])


def test_unsupported_value_of_a_known_field_raises(tmp_path):
    data = {**up.LoraConfig(target_modules=["fc1"]).to_dict(), "init_lora_weights": False}
    with pytest.raises(up.ConfigError, match="init_lora_weights=False"):
        up.AdapterConfig.load(_write(tmp_path, data))
    data = {**up.LoraConfig(target_modules=["fc1"]).to_dict(), "r": 0}
    with pytest.raises(up.ConfigError, match=r"LoraConfig\.r"):
        up.AdapterConfig.load(_write(tmp_path, data))


def test_bad_files_raise_config_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(up.ConfigError, match="not valid JSON"):
        up.AdapterConfig.load(tmp_path)
    _write(tmp_path, {"target_modules": ["fc1"]})
    with pytest.raises(up.ConfigError, match="peft_type"):
        up.AdapterConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        up.AdapterConfig.load(tmp_path / "missing")


def test_sets_and_tuples_are_normalised():
    cfg = up.LoraConfig(target_modules={"fc2", "fc1"}, exclude_modules=("x",), layers_to_transform=1)
    assert cfg.target_modules == ["fc1", "fc2"] and cfg.exclude_modules == ["x"] and cfg.layers_to_transform == [1]
