"""Bottleneck adapters from the unified view (He et al., 2022): sequential (Houlsby, Pfeiffer) and
parallel (plain and scaled), each a down-projection, a non-linearity and a zero-initialised up-projection.

  sequential: out = h + up(act(down(h))),        h = the site's output   (Houlsby / Pfeiffer)
  parallel:   out = h + s * up(act(down(x))),    x = the site's input    (He et al.; s=1, scaled: s=4)

Houlsby places a sequential adapter after the attention output and after the feed-forward output
of every layer, Pfeiffer only after the feed-forward output: that is the choice of
`target_modules` (README lists the names for BERT, GPT-2 and Llama). The non-linearity makes
none of them mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import choice, positive_int
from ..core.registry import Capabilities, register

STYLES = {"houlsby": "sequential", "pfeiffer": "sequential", "parallel": "parallel",
          "scaled_parallel": "parallel"}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class BottleneckShape(AdapterConfig):
    """The fields of a bottleneck adapter's form, declared once for the adapter and for fusions of them."""

    style: str = choice("houlsby", sorted(STYLES))
    r: int = positive_int(16)  # the bottleneck width
    scaling: float | None = None  # parallel only; None: 1 (parallel) or 4 (scaled_parallel, He et al.)
    non_linearity: str = choice("relu", sorted(ACTIVATIONS))

    def validate(self) -> None:
        super().validate()
        if self.scaling is not None and STYLES[self.style] != "parallel":
            raise ConfigError(f"{type(self).__name__}.scaling applies to parallel styles only, not {self.style!r}")

    @property
    def scale(self) -> float:
        """The parallel adapter's output scale s."""
        if self.scaling is not None:
            return float(self.scaling)
        return 4.0 if self.style == "scaled_parallel" else 1.0


@dataclass
class BottleneckConfig(BottleneckShape):
    """Bottleneck adapter of width `r` at every target (a matrix layer); `style` picks the form."""

    peft_type = "BOTTLENECK"


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of a matrix layer."""
    geo = layers.geometry(base)
    return geo.in_features, geo.out_features


class BottleneckDelta(Delta):
    """down (d_in or d_out -> r), activation, up (r -> d_out, zero at init: the identity at init)."""

    def __init__(self, base: nn.Module, config: BottleneckConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d_in, d_out = layer_dims(base)
        self.sequential = STYLES[config.style] == "sequential"
        self.scale = 1.0 if self.sequential else config.scale
        self.adapter_down = nn.Linear(d_out if self.sequential else d_in, config.r)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = nn.Linear(config.r, d_out)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = base_out if self.sequential else x
        out = self.adapter_up(self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return base_out + (self.scale * out).to(base_out.dtype)


def add_mam(model, adapter_name: str, prefix: "PrefixTuningConfig", ffn_targets: list[str] | str,  # noqa: F821
            r: int = 16, scaling: float = 4.0):
    """The MAM adapter (He et al.): prefix tuning plus a scaled parallel adapter at the feed-forward
    blocks, as two adapters `<name>_prefix` and `<name>_ffn`, both made active; returns the AdaptedModel.

    `model` is a base model (adapted here) or an AdaptedModel (the two adapters are added)."""
    from ..core.model import AdaptedModel, adapt

    ffn = BottleneckConfig(style="scaled_parallel", r=r, scaling=scaling, target_modules=ffn_targets,
                           task_type=prefix.task_type)
    names = [f"{adapter_name}_prefix", f"{adapter_name}_ffn"]
    if isinstance(model, AdaptedModel):
        model.add_adapter(names[0], prefix)
        try:
            model.add_adapter(names[1], ffn)
        except Exception:
            model.delete_adapter(names[0])
            raise
    else:
        model = adapt(model, prefix, names[0])
        try:
            model.add_adapter(names[1], ffn)
        except Exception:
            model.unload()
            raise
    model.set_adapter(names)
    return model


register("bottleneck", BottleneckConfig, BottleneckDelta,
         Capabilities(mergeable=False, mixed_batch=True, layer_types=layers.MATRIX_LAYERS, quantized_base=True),
         exports=(add_mam,))
