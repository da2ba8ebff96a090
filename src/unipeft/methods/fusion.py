"""Combining frozen bottleneck adapters: parallel average, AdapterFusion (Pfeiffer et al. 2021) and
ScaLearn (Frohmann et al. 2023).

A fusion adapter holds frozen copies of N source adapters (as buffers: saved with it, never
trained) and learns only how to combine their outputs a_i at each site (h = the site's output):

  average:    out = h + mean_i a_i                                   (nothing to train)
  fusion:     out = sum_i softmax_i(q . k_i) v_i, q = Q h, k_i = K (h + a_i), v_i = V (h + a_i)
              (Q, K, V trained; V starts as the identity)
  scalearn:   out = h + sum_i w_i * a_i   (w_i: one learned scale per source and feature; starts at
              1/N, i.e. at the average)

`fuse(model, name, sources, mode)` builds one from trained adapters of the model; a fusion config
on its own starts from random sources (useful only for tests). Stacking is `set_adapter([a, b])`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import choice, positive_int, positive_number
from ..core.registry import Capabilities, register
from .adapters import ACTIVATIONS, STYLES, BottleneckConfig, BottleneckDelta, BottleneckShape, layer_dims

MODES = ("average", "fusion", "scalearn")


@dataclass
class FusionConfig(BottleneckShape):
    """Combine `num_sources` frozen bottleneck adapters (of the form r, `style`, ...) by `mode`."""

    peft_type = "ADAPTER_FUSION"

    mode: str = choice("fusion", MODES)
    num_sources: int = positive_int(2)
    temperature: float = positive_number(1.0)  # AdapterFusion's softmax temperature

    def source_config(self) -> BottleneckConfig:
        """The config the sources were made with."""
        return BottleneckConfig(style=self.style, r=self.r, scaling=self.scaling, non_linearity=self.non_linearity,
                                target_modules=["_"])


class FusionDelta(Delta):
    """Frozen source weights as buffers; trainable combination parameters by mode."""

    # A fresh fusion combines (placeholder) source adapters until fuse() copies real ones in.
    identity_at_init = False

    def __init__(self, base: nn.Module, config: FusionConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d_in, d_out = layer_dims(base)
        n, r, src = config.num_sources, config.r, config.source_config()
        self.mode, self.temperature = config.mode, config.temperature
        self.sequential = STYLES[config.style] == "sequential"
        self.scale = 1.0 if self.sequential else src.scale
        self.act = ACTIVATIONS[config.non_linearity]()
        d_src = d_out if self.sequential else d_in
        g = torch.Generator().manual_seed(len(path))  # placeholder sources until fuse() copies real ones in
        self.register_buffer("source_down_weight", torch.randn(n, r, d_src, generator=g) / d_src ** 0.5)
        self.register_buffer("source_down_bias", torch.zeros(n, r))
        self.register_buffer("source_up_weight", torch.randn(n, d_out, r, generator=g) * 0.1 / r ** 0.5)
        self.register_buffer("source_up_bias", torch.zeros(n, d_out))
        if self.mode == "fusion":
            self.fusion_query = nn.Parameter(torch.randn(d_out, d_out) * 0.01)
            self.fusion_key = nn.Parameter(torch.randn(d_out, d_out) * 0.01)
            self.fusion_value = nn.Parameter(torch.eye(d_out))
        elif self.mode == "scalearn":
            self.scalearn_scales = nn.Parameter(torch.full((n, d_out), 1.0 / n))

    def source_outputs(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(sources, *h.shape): each frozen source adapter's a_i."""
        src = (h if self.sequential else x).to(self.source_down_weight.dtype)
        down = torch.einsum("...d,nrd->n...r", src, self.source_down_weight)
        down = down + self.source_down_bias.view(self.source_down_bias.shape[0], *([1] * (src.dim() - 1)), -1)
        up = torch.einsum("n...r,nor->n...o", self.act(down), self.source_up_weight)
        up = up + self.source_up_bias.view(self.source_up_bias.shape[0], *([1] * (src.dim() - 1)), -1)
        return self.scale * up

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = base_out.to(self.source_down_weight.dtype)
        a = self.source_outputs(x, h)
        if self.mode == "average":
            out = h + a.mean(0)
        elif self.mode == "scalearn":
            out = h + (a * self.scalearn_scales.view(a.shape[0], *([1] * (h.dim() - 1)), -1)).sum(0)
        else:
            o = h.unsqueeze(0) + a
            q = h @ self.fusion_query.T
            k = o @ self.fusion_key.T
            v = o @ self.fusion_value.T
            attn = torch.softmax((k * q.unsqueeze(0)).sum(-1) / self.temperature, dim=0)
            out = (attn.unsqueeze(-1) * v).sum(0)
        return out.to(base_out.dtype)




def fuse(model, adapter_name: str, sources: list[str], mode: str = "fusion", temperature: float = 1.0) -> None:
    """Add adapter `adapter_name` combining the (bottleneck) adapters `sources` by `mode`, and make it the
    only active one; the sources' weights are copied in frozen, the sources themselves stay as they were."""
    if not sources:
        raise ConfigError("fuse: sources is empty; name the trained bottleneck adapters to combine")
    cfgs = [model.peft_config.get(s) for s in sources]
    missing = [s for s, c in zip(sources, cfgs) if c is None]
    if missing:
        raise ConfigError(f"fuse: no adapter named {missing}; adapters: {sorted(model.peft_config)}")
    if any(type(c) is not BottleneckConfig for c in cfgs):
        raise ConfigError(f"fuse: sources must be bottleneck adapters (up.BottleneckConfig); got "
                          f"{[type(c).__name__ for c in cfgs]}")
    first = cfgs[0]
    key = lambda c: (STYLES[c.style], c.r, c.scale, c.non_linearity)  # noqa: E731
    if any(key(c) != key(first) for c in cfgs):
        raise ConfigError("fuse: sources must share style (sequential/parallel), r, scaling and non_linearity")
    paths = sorted({s.path for s in model.sites() if all(n in s.deltas for n in sources)})
    if not paths:
        raise ConfigError(f"fuse: the sources {sources} share no module")
    cfg = FusionConfig(mode=mode, num_sources=len(sources), r=first.r, style=first.style, scaling=first.scaling,
                       non_linearity=first.non_linearity, temperature=temperature,
                       target_modules=paths, task_type=first.task_type)
    model.add_adapter(adapter_name, cfg)
    with torch.no_grad():
        for fused in model.deltas(adapter_name):
            srcs: list[BottleneckDelta] = [model.delta_at(n, fused.path) for n in sources]
            fused.source_down_weight.copy_(torch.stack([d.adapter_down.weight for d in srcs]))
            fused.source_down_bias.copy_(torch.stack([d.adapter_down.bias for d in srcs]))
            fused.source_up_weight.copy_(torch.stack([d.adapter_up.weight for d in srcs]))
            fused.source_up_bias.copy_(torch.stack([d.adapter_up.bias for d in srcs]))
    model.set_adapter(adapter_name)


register("fusion", FusionConfig, FusionDelta,
         Capabilities(mergeable=False, mixed_batch=True, layer_types=layers.MATRIX_LAYERS, quantized_base=True),
         exports=(fuse,))
