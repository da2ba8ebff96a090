"""AdapterConfig: the fields every method shares, and its JSON (PEFT-compatible) round trip."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError
from .fields import check_rules, name_spec

if TYPE_CHECKING:  # annotations only: core/config.py needs neither at run time
    from torch import nn

    from .hooks import TrainerCallback

CONFIG_NAME = "adapter_config.json"

# PEFT keys that carry no behaviour for us; accepted and dropped silently.
_INERT_PEFT_KEYS = {"revision", "auto_mapping", "peft_version"}


def _is_default_like(value: Any) -> bool:
    return value is None or value is False or value in ("", "none") or value == {} or value == []


@dataclass
class AdapterConfig:
    """Base of every method's config: where the method sits, plus the bookkeeping PEFT stores.

    Subclasses set `method` (registry name), `peft_type` (the on-disk type string),
    `peft_names` (our field -> PEFT key), `peft_class` (PEFT's config class name), `peft_inert` (PEFT keys we do not model, with the
    value at which they change nothing: any other value is an error, not a silent drop) and
    `not_in_peft` (our fields PEFT's config lacks: omitted from the file while unset).
    Keys nobody knows are dropped with a warning while empty (forward compatibility) and
    refused when set, since dropping them could silently change the adapter's behaviour.

    The method protocol (DESIGN.md) is declared here with no-op defaults, so core/ and train/
    call it without probing: `resolved_fields`, `make_bank`, `training_callbacks`,
    `optimizer_groups`, `needs_calibration`, `calibrated_fields`, `call_inputs`, `state_prefix`,
    `example_fields`. Field rules are
    declared with the helpers of core/fields.py and checked by `validate`. The copy an
    AdaptedModel stores is frozen: assigning to it raises.
    """

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    peft_names: ClassVar[dict[str, str]] = {}
    peft_inert: ClassVar[dict[str, Any]] = {}
    not_in_peft: ClassVar[tuple[str, ...]] = ()
    # PEFT's config class for this method ("LoraConfig"); unipeft.compat exposes a factory under that
    # name taking PEFT's field names. Empty: PEFT has no such method.
    peft_class: ClassVar[str] = ""
    # Where this method's per-site tensors live in the file (PEFT's LoRA-style wrapper prefix).
    state_prefix: ClassVar[str] = "base_model.model."
    # Keyword inputs of a model call this method reads (e.g. "task_ids"): the AdaptedModel takes
    # them out of the call and hands them to the deltas through the forward context.
    call_inputs: ClassVar[tuple[str, ...]] = ()

    target_modules: list[str] | str | None = name_spec()
    exclude_modules: list[str] | str | None = name_spec()
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # PEFT hands out sets for name lists
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                setattr(self, f.name, sorted(value))
            elif isinstance(value, tuple):
                setattr(self, f.name, list(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise ConfigError(f"{type(self).__name__}.{name}: this config belongs to an adapted model and is "
                              f"immutable; use config.replace({name}=...) and add a new adapter")
        super().__setattr__(name, value)

    def frozen_copy(self, **changes: Any) -> "AdapterConfig":
        """A validated copy with `changes`, immutable from now on (what an AdaptedModel stores)."""
        out = dataclasses.replace(self, **changes)
        object.__setattr__(out, "_frozen", True)
        return out

    def validate(self) -> None:
        """Check field values; subclasses extend this and raise ConfigError naming the field."""
        check_rules(self)
        if self.layers_to_transform is not None and not all(
                isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
            raise ConfigError(f"{type(self).__name__}.layers_to_transform: expected non-negative integers, "
                              f"got {self.layers_to_transform!r}")

    # ---- the method protocol (no-op defaults) ---------------------------------------------
    def resolved_fields(self, model: "nn.Module", targets: list[tuple[str, "nn.Module"]]) -> dict[str, Any]:
        """Fields read from the model at injection (e.g. widths, fan_in_fan_out), stored in the adapter's copy."""
        return {}

    def needs_calibration(self) -> str | None:
        """"activations" or "gradients" when building the deltas needs calibration data (data-aware inits)."""
        return None

    def calibrated_fields(self, stats: dict[str, Any], targets: list[tuple[str, "nn.Module"]]) -> dict[str, Any]:
        """Fields decided by the calibration statistics ({path: TargetStats}) before the deltas are built
        (e.g. EVA's per-layer ranks), stored in the adapter's copy of the config."""
        return {}

    def make_bank(self, model: "nn.Module", targets: list[tuple[str, "nn.Module"]]) -> "nn.Module | None":
        """The module shared by all sites of one adapter (shared bases, vector banks, routers), or None."""
        return None

    def training_callbacks(self, model: "nn.Module", adapter_name: str) -> list["TrainerCallback"]:
        """Callbacks the trainer runs for this adapter (re-selection, rank allocation, ...)."""
        return []

    def optimizer_groups(self, adapter_name: str) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups ({"params": regex, "lr": ...}), after the user's groups."""
        return []

    def loads_without_calibration(self) -> bool:
        """Whether a saved adapter of this config loads with no calibration data although its init needs
        some (the data shaped only tensors the file holds, nothing in the base): shapes are built, the file
        fills them."""
        return False

    def parameter_targets(self) -> list[str]:
        """Bare parameters the method adapts besides modules (PEFT's target_parameters, e.g.
        ["experts.gate_up_proj"]); their owning modules become sites."""
        return []

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Fields beyond target_modules for a working example on models whose targets are `candidates`."""
        return {}

    # ---- dict / JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialise with PEFT's key names and `peft_type`, so PEFT can read the file."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.not_in_peft and value is None:
                continue
            out[self.peft_names.get(f.name, f.name)] = self._value_to_peft(f.name, value)
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build the config of `data['peft_type']` (or of `cls`); unknown keys are warned and dropped."""
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target = cls
        if peft_type is not None and peft_type != cls.peft_type:
            from .registry import method_for_peft_type
            target = method_for_peft_type(peft_type).config_cls
        return target._from_peft_dict(data)

    @classmethod
    def _from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        reverse = {v: k for k, v in cls.peft_names.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = reverse.get(key, key)
            if name in known:
                kwargs[name] = cls._value_from_peft(name, value)
            elif key in _INERT_PEFT_KEYS or (key in cls.peft_inert and value in (None, cls.peft_inert[key])):
                # (None: PEFT fills some of these in only in get_peft_model, e.g. num_transformer_submodules)
                continue
            elif key in cls.peft_inert or not _is_default_like(value):
                supported = sorted(cls.peft_names.get(k, k) for k in known)
                raise ConfigError(f"{cls.__name__} ({cls.peft_type}): field '{key}'={value!r} is not supported by "
                                  f"unipeft; supported fields: {supported}")
            else:
                warnings.warn(f"{cls.__name__}: unknown config key '{key}' ignored", stacklevel=3)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        """Convert one field to its PEFT JSON value (override for renamed enums)."""
        return value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        """Inverse of `_value_to_peft`."""
        return value

    def save(self, directory: str | Path) -> Path:
        """Write adapter_config.json into `directory`."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @staticmethod
    def load(directory: str | Path) -> "AdapterConfig":
        """Read adapter_config.json from `directory` (any registered method)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or "peft_type" not in data:
            raise ConfigError(f"{path}: expected a JSON object with a 'peft_type' key")
        return AdapterConfig.from_dict(data)

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def list_field(default: list | None = None):
    """A dataclass field defaulting to a fresh copy of `default`."""
    return field(default_factory=lambda: list(default or []))
