"""How a run applies, saves, reloads and describes its method: one strategy object per built `method` section.

Adapter methods (the registry's) go through AdapterStrategy; the built-in 'full' is its own
strategy (FullFineTuneConfig). Callers use the strategy's methods instead of branching on
the method's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

from ..core.config import AdapterConfig
from .full import FULL, FullFineTuneConfig
from .schema import field_types

if TYPE_CHECKING:  # annotations only: the config module imports this one and stays light
    from torch import nn

ADAPTER_DIR = "adapter"

# Methods that are not in the core registry, by name: their config class is their strategy.
BUILT_IN_METHODS: dict[str, type[FullFineTuneConfig]] = {FULL: FullFineTuneConfig}

MethodConfig = Union[AdapterConfig, FullFineTuneConfig]


class MethodStrategy(Protocol):
    """What the training code needs from a method."""

    saved_as: str

    @property
    def config(self) -> MethodConfig: ...

    def needs_calibration(self) -> str | None: ...

    def apply(self, base: nn.Module, calibration: Any = None) -> nn.Module: ...

    def save(self, model: nn.Module, run_dir: Path) -> None: ...

    def load(self, base: nn.Module, run_dir: Path) -> nn.Module: ...


def _task_type(task: str) -> str:
    """PEFT's task type for a run task."""
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


@dataclass(frozen=True)
class AdapterStrategy:
    """A registry method: adapt the base model, save/load the PEFT-format adapter/ folder."""

    config: AdapterConfig
    task: str  # the run's task: picks the PEFT task_type when the config leaves it unset

    saved_as = ADAPTER_DIR + "/"  # not annotated, so not a dataclass field

    @staticmethod
    def fields(name: str) -> dict[str, Any]:
        """{field: type} of registry method `name`'s config (without the runtime-only inference_mode)."""
        from ..core.registry import get_method
        return {k: v for k, v in field_types(get_method(name).config_cls).items() if k != "inference_mode"}

    @staticmethod
    def info_line(name: str) -> str:
        """What `unipeft info --methods` prints for registry method `name`."""
        return f"{name}: {', '.join(AdapterStrategy.fields(name))}"

    def needs_calibration(self) -> str | None:
        """What the method's init needs from data ("activations" / "gradients"), or None."""
        return self.config.needs_calibration()

    def apply(self, base: nn.Module, calibration: Any = None) -> nn.Module:
        """Adapt `base` (classification heads are trained too, as PEFT's SEQ_CLS does); `calibration`:
        batches for a data-aware init (train/calibrate.py)."""
        from ..core.model import adapt
        from ..interop.peft import apply_task_type

        config = self.config
        if config.task_type is None:  # recorded in adapter_config.json, as PEFT does
            config = config.replace(task_type=_task_type(self.task))
        return adapt(base, apply_task_type(config), calibration=calibration)

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write the PEFT-format adapter folder run_dir/adapter."""
        model.save_pretrained(Path(run_dir) / ADAPTER_DIR)

    def load(self, base: nn.Module, run_dir: Path) -> nn.Module:
        """`base` with the adapter save() wrote."""
        from ..core.model import AdaptedModel
        return AdaptedModel.from_pretrained(base, Path(run_dir) / ADAPTER_DIR)


def strategy_for(config: MethodConfig, task: str) -> MethodStrategy:
    """The strategy of a built method config (the one place that tells 'full' from adapters)."""
    if isinstance(config, FullFineTuneConfig):
        return config
    return AdapterStrategy(config, task)
