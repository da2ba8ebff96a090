"""Adapter+ (Steitz & Roth, 2024): a bottleneck adapter with channel-wise scaling, Houlsby init and
stochastic depth, placed after the feed-forward block ("Post-Adapter").

    out = h + s * drop_path(up(act(down(h))))     h = the site's output, s in R^d (ones at init)

The paper and AdapterHub's AdapterPlusConfig (mh_adapter=False, output_adapter=True) both put the adapter
after the feed-forward block, so the default sites are the feed-forward output projections (any matrix
layer can be named in `target_modules`, e.g. attention outputs). Houlsby init draws down and up weights
from a normal(0, 0.01) truncated to +-0.02 with zero biases, so a fresh adapter is close to, but not
exactly, the identity. Stochastic depth drops the adapter's output per sample while training (probability
`stochastic_depth`, survivors scaled by 1 / (1 - p)). Not mergeable (non-linear).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import Rule, choice, fraction, ruled
from ...core.registry import Capabilities, register
from ._common import ACTIVATIONS, bottleneck_width, check_reduction_factor, is_ffn_output, out_width

SCALINGS = ("channel", "learned")


def _is_scaling(v) -> bool:
    return v in SCALINGS or (isinstance(v, (int, float)) and not isinstance(v, bool))


@dataclass
class AdapterPlusConfig(AdapterConfig):
    """Adapter+: bottleneck width hidden // `reduction_factor`, GELU, channel-wise scaling, Houlsby init."""

    peft_type = "ADAPTER_PLUS"
    reduction_factor: float = 96
    non_linearity: str = choice("gelu", sorted(ACTIVATIONS))
    scaling: float | str = ruled("channel", Rule(_is_scaling, f"a number or one of {list(SCALINGS)}"))
    init_weights: str = choice("houlsby", ["houlsby", "identity"])
    stochastic_depth: float = fraction(0.1)
    dropout: float = fraction(0.0)

    def validate(self) -> None:
        super().validate()
        check_reduction_factor(type(self).__name__, self.reduction_factor)
        if not isinstance(self.scaling, str) and self.scaling == 0:
            raise ConfigError(f"{type(self).__name__}.scaling: expected 'channel', 'learned' or a non-zero number, "
                              f"got 0 (the adapter would never change the output)")

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Toy widths are 16: a bottleneck of 4; no stochastic depth, so runs are deterministic."""
        return {"reduction_factor": 4, "stochastic_depth": 0.0}


def houlsby_init(linear: nn.Linear) -> None:
    """Houlsby et al.: weights ~ N(0, 0.01) truncated at +-0.02, bias zero."""
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
    nn.init.zeros_(linear.bias)


class AdapterPlusDelta(Delta):
    """Sequential bottleneck adapter on the site's output with a learned per-channel output scale."""

    identity_at_init = False

    def __init__(self, base: nn.Module, config: AdapterPlusConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d = out_width(base)
        width = bottleneck_width(type(config).__name__, path, d, config.reduction_factor)
        self.adapter_down = nn.Linear(d, width)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = nn.Linear(width, d)
        houlsby_init(self.adapter_down)
        houlsby_init(self.adapter_up)
        if config.init_weights == "identity":
            nn.init.zeros_(self.adapter_up.weight)
            self.identity_at_init = True
        if config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(d))
        elif config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scaling", torch.tensor(float(config.scaling)), persistent=False)
        self.drop_path = config.stochastic_depth
        self.dropout = nn.Dropout(config.dropout)
        self.train(base.training)  # dropout / stochastic depth follow the base's train/eval mode

    def _stochastic_depth(self, up: torch.Tensor) -> torch.Tensor:
        """Per-sample drop of the adapter branch while training (torchvision's StochasticDepth, mode 'row')."""
        p = self.drop_path
        if not self.training or p == 0.0:
            return up
        keep = torch.empty((up.shape[0],) + (1,) * (up.dim() - 1), device=up.device).bernoulli_(1.0 - p)
        return up * keep.to(up.dtype) / (1.0 - p)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = base_out.to(self.adapter_down.weight.dtype)
        up = self._stochastic_depth(self.adapter_up(self.act(self.adapter_down(h))))
        return base_out + self.dropout(up * self.scaling).to(base_out.dtype)


register("adapterplus", AdapterPlusConfig, AdapterPlusDelta,
         Capabilities(mergeable=False, mixed_batch=True, layer_types=layers.MATRIX_LAYERS),
         default_targets=is_ffn_output)
