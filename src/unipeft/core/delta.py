"""Delta: the base class of every method's modification at one site (see DESIGN.md)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .errors import MergeError


class Delta(nn.Module):
    """A method's trainable modification of one base module.

    `kind` says how the site composes it (the unified view):
      "output": `forward(x, base_out)` returns the new output (parallel additive, sequential,
                scaling);
      "input":  `pre(x)` transforms the input before the base module runs;
      "weight": `weight_overrides(params)` returns the parameters the base module runs with
                (in-place/sparse updates, bias tuning, full copies).
    `delta_weight()` returns {base parameter name: additive delta} for merging; core merges.
    `weight_dependent` deltas are computed from the base weights, so core caches what it added
    at merge time to undo exactly that at unmerge.
    """

    kind: ClassVar[str] = "output"
    weight_dependent: ClassVar[bool] = False

    def __init__(self, base: nn.Module, config, path: str) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the base must not appear in the delta's state.
        object.__setattr__(self, "_base", base)
        self.path = path

    @property
    def base(self) -> nn.Module:
        """The frozen module this delta modifies."""
        return self._base

    @classmethod
    def create(cls, base: nn.Module, config, path: str) -> "Delta":
        """Build the delta for `base` (override to dispatch on the layer type)."""
        return cls(base, config, path)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def forward_grouped(cls, deltas: list["Delta | None"], x: torch.Tensor, base_out: torch.Tensor,
                        row_group: torch.Tensor) -> torch.Tensor | None:
        """Optional batched mixed-batch path: row i gets deltas[row_group[i]] (None = no delta).

        Core calls it when every group's delta is of this class; return None to fall back to
        running each group's slice separately.
        """
        return None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Input-side transform (kind "input")."""
        return x

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters the base runs with (kind "weight"); `params` holds the current ones."""
        raise NotImplementedError

    def delta_weight(self) -> dict[str, torch.Tensor]:
        """{base parameter name: delta} so that merged base == base with this delta applied."""
        raise MergeError(f"{type(self).__name__} at '{self.path}' has no weight-space form")

    def saved_key(self, key: str) -> str:
        """Map a key of this delta's state_dict to its on-disk suffix (PEFT's name)."""
        return key
