"""Method 'full': fine-tune the model's own parameters (all, or those matching `trainable`), as one strategy object."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from .schema import field_types

if TYPE_CHECKING:  # annotations only: the config module imports this one and stays light
    from torch import nn

FULL = "full"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass(eq=False)  # __eq__ below: also equal to the options dict this class replaced
class FullFineTuneConfig:
    """The `method` section of a 'full' run, and how such a run is applied, saved, reloaded and described."""

    trainable: list[str] | None = None  # regexes (re.search) of parameter names; None: all parameters

    saved_as = WEIGHTS_FILE  # not annotated, so not a dataclass field: the trained weights in the run folder

    @property
    def config(self) -> FullFineTuneConfig:
        """The method config (for 'full' the strategy is its own config)."""
        return self

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """{field: type} of the method section besides `name`."""
        return field_types(cls)

    @classmethod
    def info_line(cls) -> str:
        """What `unipeft info --methods` prints for 'full'."""
        return f"{FULL}: trainable (regexes of parameter names; default: all)"

    def needs_calibration(self) -> str | None:
        """Full fine-tuning needs no calibration data."""
        return None

    def apply(self, base: nn.Module, calibration: Any = None) -> nn.Module:
        """`base` itself, with requires_grad set on the parameters `trainable` matches (all when unset)."""
        patterns = self.trainable
        if patterns:
            hits = 0
            for pname, p in base.named_parameters():
                p.requires_grad_(any(re.search(rx, pname) for rx in patterns))
                hits += p.requires_grad
            if not hits:
                raise ConfigError(f"method.trainable={patterns!r} matches no parameter of {type(base).__name__}")
        return base

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write the trained parameters to run_dir/trainable.safetensors."""
        from safetensors.torch import save_file

        from .checkpoint import trainable_state
        save_file(trainable_state(model), str(Path(run_dir) / WEIGHTS_FILE))

    def load(self, base: nn.Module, run_dir: Path) -> nn.Module:
        """`base` with the parameters save() wrote copied back in."""
        from safetensors.torch import load_file

        from .checkpoint import load_trainable_state
        model = self.apply(base)
        load_trainable_state(model, load_file(str(Path(run_dir) / WEIGHTS_FILE)))
        return model

    def options(self) -> dict[str, Any]:
        """The set options as a dict (unset ones left out)."""
        return {"trainable": self.trainable} if self.trainable is not None else {}

    def __eq__(self, other: object) -> bool:
        # build_method_config returned a plain options dict for 'full' before this class existed;
        # comparing against one keeps working (None, the default, counts as absent on both sides).
        if isinstance(other, FullFineTuneConfig):
            return self.trainable == other.trainable
        if isinstance(other, Mapping):
            return self.options() == {k: v for k, v in other.items() if v is not None}
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclasses around it
