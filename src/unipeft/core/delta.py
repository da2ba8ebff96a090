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

    `bank` is the adapter's shared module (`AdapterConfig.make_bank`), the same object at every
    site of one adapter, or None. Per-call inputs the config declares (`call_inputs`) are read
    with `call_input(name)`. `base_edits()` may return new values for base parameters (e.g. a
    residual left after an SVD-based init); core applies them and restores the originals
    exactly on delete/unload.
    """

    kind: ClassVar[str] = "output"
    weight_dependent: ClassVar[bool] = False
    # Model-level input side (prompts, prefixes): the AdaptedModel calls `prepare_inputs` on the
    # forward's keyword arguments before the base model runs (see core/model.py).
    model_input: ClassVar[bool] = False
    # On-disk keys are file-level (PEFT's `prompt_embeddings`), not under the site's path.
    state_at_root: ClassVar[bool] = False
    # A freshly created delta leaves the model's outputs unchanged (the invariant suite checks it).
    identity_at_init: ClassVar[bool] = True
    # Two such deltas stacked at one site give the same output in either order, equal to merging
    # both (additive updates, scalings): the invariant suite checks stacking against that.
    commutes: ClassVar[bool] = False
    # `fused_call(x)` may compute the site's whole output (base layer and this delta) in one step.
    fuses_base: ClassVar[bool] = False

    def __init__(self, base: nn.Module, config, path: str, bank: nn.Module | None = None) -> None:
        super().__init__()
        # Plain attributes, not submodules: neither the base nor the shared bank belongs to this
        # delta's state (the bank is saved once, under the adapter's root key).
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_ctx", None)
        self.path = path

    @property
    def base(self) -> nn.Module:
        """The frozen module this delta modifies."""
        return self._base

    @property
    def bank(self) -> nn.Module | None:
        """The adapter's shared module (None when the method has none)."""
        return self._bank

    def bind(self, ctx) -> None:
        """Called by core once the delta is injected: the forward context of its model."""
        object.__setattr__(self, "_ctx", ctx)

    def call_input(self, name: str):
        """The current model call's value of a declared per-call input (None when not given)."""
        ctx = self._ctx
        return None if ctx is None else ctx.inputs.get(name)

    @classmethod
    def create(cls, base: nn.Module, config, path: str, bank: nn.Module | None = None,
               calibration=None) -> "Delta":
        """Build the delta for `base` (override to dispatch on the layer type or use `calibration`,
        the per-target statistics core collected when the config asked for them)."""
        return cls(base, config, path, bank)

    def base_edits(self) -> dict[str, torch.Tensor]:
        """{base parameter name: new value} core writes at injection and undoes exactly at removal."""
        return {}

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

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The site's output, base layer included, for input `x`; None: use the plain path.

        Core calls it (for classes with `fuses_base`) when this is the only delta applied at its
        site and the base is called with `x` alone. It must equal what the site computes with this
        delta alone (`forward(x, base(x))` for an output delta; the base with `weight_overrides` for
        a weight delta), up to rounding."""
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

    def merged_write(self, name: str, value: torch.Tensor) -> bool:
        """Write the merge into base parameter `name` yourself (an exact form: rescaled packed scales,
        an exactly quantized weight) and return True; False (default): core writes `value` (the
        current value + delta_weight()[name]), requantizing packed weights."""
        return False

    def saved_key(self, key: str) -> str:
        """Map a key of this delta's state_dict to its on-disk suffix (PEFT's name)."""
        return key

    def export_state(self) -> dict[str, torch.Tensor]:
        """{on-disk suffix: tensor} to save (default: the state_dict under `saved_key` names)."""
        return {self.saved_key(k): v for k, v in self.state_dict().items()}

    def optional_state(self, suffix: str) -> bool:
        """Whether a file may lack `suffix` (e.g. a prompt encoder that PEFT does not save)."""
        return False

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checked on-disk tensors (suffix -> tensor, shapes as `export_state`) into this delta."""
        own = {self.saved_key(k): k for k in self.state_dict()}
        params = dict(self.named_parameters())
        with torch.no_grad():
            for suffix, tensor in tensors.items():
                key = own[suffix]
                target = params[key] if key in params else self.get_buffer(key)
                target.copy_(tensor.to(target.dtype))

    def prepare_inputs(self, model, kwargs: dict):
        """Model-level input side (`model_input` deltas): return (new kwargs, output post-processor or None)."""
        raise NotImplementedError
