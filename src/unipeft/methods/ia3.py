"""IA3: learned scaling vectors on outputs (attention) or inputs (feed-forward) of linear/conv layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.registry import Capabilities, register
from ..core.targets import name_matches


@dataclass
class IA3Config(AdapterConfig):
    """IA3: out = base(x) * l, or base(x * l) on `feedforward_modules`; l starts at ones."""

    peft_type = "IA3"
    not_in_peft = ("layers_to_transform", "layers_pattern")
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self) -> None:
        super().validate()
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, (str, list)):
            raise ConfigError(f"IA3Config.feedforward_modules: expected a list of names or a regex, got {ff!r}")


class IA3Delta(Delta):
    """The vector `ia3_l`, shaped as PEFT stores it: (out, 1) / (1, in) for Linear, (1, C, 1..) for conv."""

    weight_dependent = True

    def __init__(self, base: nn.Module, config: IA3Config, path: str) -> None:
        super().__init__(base, config, path)
        self.feedforward = bool(config.feedforward_modules) and name_matches(path, config.feedforward_modules)
        self.kind = "input" if self.feedforward else "output"
        w = base.weight
        config.fan_in_fan_out = isinstance(base, Conv1D)  # what PEFT records for GPT-2's Conv1D
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            channels = base.in_channels if self.feedforward else base.out_channels
            shape = (1, channels) + (1,) * (w.dim() - 2)
        else:
            out_f, in_f = (w.shape[1], w.shape[0]) if isinstance(base, Conv1D) else w.shape
            shape = (1, in_f) if self.feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if config.init_ia3_weights else torch.randn(shape))

    def _vector(self) -> torch.Tensor:
        """The scaling as a broadcastable vector over the channel/feature dim of activations."""
        if isinstance(self.base, (nn.Conv1d, nn.Conv2d)):
            return self.ia3_l
        return self.ia3_l.flatten()

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self._vector()).to(x.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (base_out * self._vector()).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        base, l = self.base, self.ia3_l
        w = base.weight
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            scale = l if self.feedforward else l.transpose(0, 1)
        elif isinstance(base, Conv1D):
            scale = l.T  # weight is (in, out)
        else:
            scale = l
        out = {"weight": w * (scale - 1)}
        if not self.feedforward and base.bias is not None:
            out["bias"] = base.bias * (l.reshape(base.bias.shape) - 1)
        return out


register("ia3", IA3Config, Capabilities(mergeable=True, mixed_batch=True,
                                        layer_types=(nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d),
                                        peft_compatible=True))(IA3Delta)
