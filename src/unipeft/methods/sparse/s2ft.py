"""S2FT: structured sparse fine-tuning of selected attention heads and FFN channels, computed densely.

In each target matrix a few input channels are selected: whole attention heads (groups of
`head_dim` consecutive input channels) in `head_modules` (the attention output projection),
single channels elsewhere (the FFN down projection). Only those columns of W train, as a dense
(out x m) block: forward adds x[..., cols] @ D^T, so forward and backward are small dense
matmuls and no sparse kernel is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import positive_int, unit_ratio
from ...core.registry import Capabilities, register
from ...core.targets import name_matches
from .base import SPARSE_LAYERS, path_seed, require_matrix_layer


@dataclass
class S2ftConfig(AdapterConfig):
    """S2FT: `ratio` of the heads (in `head_modules`, `head_dim` channels each) or channels of each target train."""

    peft_type = "S2FT"

    ratio: float = unit_ratio(0.1, "ratio")
    head_modules: list[str] | None = None
    head_dim: int | None = positive_int(None, optional=True)
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.head_modules and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ConfigError(f"S2ftConfig.head_dim: head_modules={self.head_modules!r} are split into heads, so "
                              f"head_dim must be a positive integer (e.g. 32 for MiniLM), got {self.head_dim!r}")


def select_channels(in_features: int, config: S2ftConfig, path: str) -> torch.Tensor:
    """Sorted input channels of the selected heads (head modules) or of the selected single channels."""
    g = torch.Generator().manual_seed(path_seed(config.seed, path))
    if config.head_modules and name_matches(path, config.head_modules):
        hd = config.head_dim
        if in_features % hd:
            raise TargetError(f"S2ftConfig: '{path}' has {in_features} input channels, not a multiple of "
                              f"head_dim={hd}")
        n_heads = in_features // hd
        heads = torch.randperm(n_heads, generator=g)[:max(1, round(config.ratio * n_heads))].sort().values
        return (heads[:, None] * hd + torch.arange(hd)).flatten()
    m = max(1, round(config.ratio * in_features))
    return torch.randperm(in_features, generator=g)[:m].sort().values


class S2ftDelta(Delta):
    """out = base(x) + x[..., channels] @ D^T; D (out x m) starts at zero."""

    kind = "output"
    commutes = True  # additive

    def __init__(self, base: nn.Module, config: S2ftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        require_matrix_layer(base, config, path)
        w = layers.dense_weight(base)
        channels = select_channels(w.shape[1], config, path).to(w.device)
        self.register_buffer("channels", channels)
        self.weight = nn.Parameter(torch.zeros(w.shape[0], channels.numel(), dtype=torch.float32, device=w.device))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = x.index_select(-1, self.channels)
        h = h if h.dtype == self.weight.dtype else h.to(self.weight.dtype)
        return base_out + F.linear(h, self.weight).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        geo = layers.geometry(self.base)
        d = torch.zeros(geo.out_features, geo.in_features, dtype=self.weight.dtype, device=self.weight.device)
        return {"weight": layers.to_param_layout(self.base, d.index_copy(1, self.channels, self.weight))}

    def saved_key(self, key: str) -> str:
        return f"s2ft_{key}"


register("s2ft", S2ftConfig, S2ftDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=SPARSE_LAYERS, quantized_base=True))
