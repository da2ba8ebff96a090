"""IA3: learned scaling vectors on outputs (attention) or inputs (feed-forward) of linear/conv layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.fields import name_spec
from ..core.registry import Capabilities, register
from ..core.targets import name_matches


@dataclass
class IA3Config(AdapterConfig):
    """IA3: out = base(x) * l, or base(x * l) on `feedforward_modules`; l starts at ones."""

    peft_class = "IA3Config"
    peft_type = "IA3"
    not_in_peft = ("layers_to_transform", "layers_pattern")
    feedforward_modules: list[str] | str | None = name_spec()
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def resolved_fields(self, model, targets) -> dict:
        """What PEFT records for GPT-2's transposed Conv1D."""
        return {"fan_in_fan_out": any(layers.is_transposed(m) for _, m in targets)}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Every other target scales its input (feed-forward form), the rest their output."""
        return {"feedforward_modules": candidates[1::2]}


class IA3Delta(Delta):
    """The vector `ia3_l`, shaped as PEFT stores it: (out, 1) / (1, in) for Linear, (1, C, 1..) for conv."""

    weight_dependent = True
    commutes = True  # scalings of the same input/output multiply in either order

    def __init__(self, base: nn.Module, config: IA3Config, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.feedforward = bool(config.feedforward_modules) and name_matches(path, config.feedforward_modules)
        self.kind = "input" if self.feedforward else "output"
        geo = layers.geometry(base)
        if geo.kind == "conv":
            channels = geo.in_features if self.feedforward else geo.out_features
            shape = (1, channels) + (1,) * len(geo.kernel_size)
        else:
            shape = (1, geo.in_features) if self.feedforward else (geo.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if config.init_ia3_weights else torch.randn(shape))

    def _vector(self) -> torch.Tensor:
        """The scaling as a broadcastable vector over the channel/feature dim of activations."""
        if layers.geometry(self.base).kind == "conv":
            return self.ia3_l
        return self.ia3_l.flatten()

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self._vector()).to(x.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (base_out * self._vector()).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        base, l = self.base, self.ia3_l
        if layers.geometry(base).kind == "conv":
            w = base.weight
            out = {"weight": w * ((l if self.feedforward else l.transpose(0, 1)) - 1)}
        else:  # scale the dense (out, in) weight by rows (output form) or columns (feed-forward form)
            w = layers.dense_weight(base)
            out = {"weight": layers.to_param_layout(base, w * (l - 1))}
        if not self.feedforward and base.bias is not None:
            out["bias"] = base.bias * (l.reshape(base.bias.shape) - 1)
        return out


register("ia3", IA3Config, IA3Delta, Capabilities(mergeable=True, mixed_batch=True,
                                                  layer_types=layers.MATRIX_LAYERS + (nn.Conv1d, nn.Conv2d),
                                                  peft_compatible=True, quantized_base=True))
