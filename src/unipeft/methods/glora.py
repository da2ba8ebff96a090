"""GLoRA: a generalised update of a linear layer's weight and bias, both read from the frozen layer.

For a frozen Linear with weight W0 (out, in) and bias b0 (out,), the adapted layer computes with

  W_eff = W0 + W0 * A + B          (* is the element-wise product; A, B broadcast to (out, in))
  b_eff = b0 + b0 * D + E + W0 @ C (C is an (in, 1) column; D, E broadcast to (out,))

Each of A and B (together, `config_A_B`), C (`config_C`) and D and E (together, `config_D_E`) is
parameterised as "lora" (a rank-r product Xd @ Xu), "vector" (one value per output channel, or per
input for C), "constant" (one scalar) or "none" (fixed zeros, no parameters). C, D and E exist only for
layers with a bias (zeros otherwise), as in PEFT. The tensors sit in per-path submodules named as PEFT
names them (`glora_A.Xd`, `glora_D.X`, `glora_C.zeros`, ...), so the file's keys are PEFT's; a disabled
path keeps its zeros buffer because PEFT's file has it too.

The delta is output-side: out = base(x) + x @ (W0 * A + B)^T + (b0 * D + E + W0 @ C), so several active
adapters each add their own update against the same base layer, as in PEFT. Its weight-space form is
exactly that update, so core merges it; it is computed from the base weights, so core caches what it
added to undo exactly that. Core merges adapters one after another, so a second GLoRA adapter merged into
the same layer reads the already merged weights (PEFT merges all against the original ones): one merged
adapter per layer equals its unmerged forward exactly. init_weights=True (default) zeros every down factor:
the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.fields import choice, positive_int
from ..core.registry import Capabilities, register

A_B_FORMS = ("lora", "vector", "constant", "none")
C_FORMS = ("lora", "vector", "none")
D_E_FORMS = ("vector", "constant", "none")


@dataclass
class GloraConfig(AdapterConfig):
    """GLoRA (PEFT's GloraConfig): W_eff = W0 + W0*A + B, b_eff = b0 + b0*D + E + W0 @ C on Linear layers;
    config_A_B / config_C / config_D_E pick each path's form, r the rank of the "lora" forms."""

    peft_class = "GloraConfig"
    peft_type = "GLORA"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern")

    r: int = positive_int(8)
    bias: str = choice("none", ["none"])
    config_A_B: str = choice("lora", A_B_FORMS)
    config_C: str = choice("lora", C_FORMS)
    config_D_E: str = choice("constant", D_E_FORMS)
    init_weights: bool = True

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """A small rank fits every toy layer."""
        return {"r": 2}


class LowRankPath(nn.Module):
    """Xd @ Xu, (rows, r) @ (r, cols); Xd starts at zero when `zero` (the identity), Kaiming otherwise."""

    def __init__(self, rows: int, cols: int, r: int, zero: bool) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
        if not zero:
            nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class VectorPath(nn.Module):
    """One value per channel: X (n, 1) for the weight and C paths, (n,) for the bias paths."""

    def __init__(self, n: int, column: bool, zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros((n, 1) if column else (n,)))
        if not zero:
            nn.init.kaiming_uniform_(self.X if column else self.X.unsqueeze(0), a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.X


class ScalarPath(nn.Module):
    """One scalar X (1,), N(0, 0.02) when not zero."""

    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        if not zero:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class ZeroPath(nn.Module):
    """A disabled path: a fixed zeros buffer of the path's full shape (saved, as in PEFT's file)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.zeros


def _path(form: str, zero: bool, rows: int, cols: int, r: int, column: bool) -> nn.Module:
    """The submodule for one path of shape (rows, cols) (cols 0: a bias-shaped (rows,) path)."""
    if form == "lora":
        return LowRankPath(rows, cols, r, zero)
    if form == "vector":
        return VectorPath(rows, column, zero)
    if form == "constant":
        return ScalarPath(zero)
    return ZeroPath((rows, cols) if cols else (rows,))


class GloraDelta(Delta):
    """The five paths glora_A..glora_E of one Linear layer."""

    weight_dependent = True  # the update reads W0 and b0

    def __init__(self, base: nn.Module, config: GloraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        out_f, in_f, r = geo.out_features, geo.in_features, config.r
        zero = bool(config.init_weights)
        self.has_bias = base.bias is not None
        # The creation order is PEFT's, so a seeded init draws the same numbers.
        self.glora_A = _path(config.config_A_B, zero, out_f, in_f, r, column=True)
        self.glora_B = _path(config.config_A_B, zero, out_f, in_f, r, column=True)
        c_form = config.config_C if self.has_bias else "none"
        self.glora_C = _path(c_form, zero, in_f, 1, r, column=True)
        de_form = config.config_D_E if self.has_bias else "none"
        self.glora_D = _path(de_form, zero, out_f, 0, r, column=False)
        self.glora_E = _path(de_form, zero, out_f, 0, r, column=False)
        self.identity_at_init = zero

    def _updates(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dW (out, in), db (out,) or None): the weight and bias changes against the base's current values."""
        w = layers.dense_weight(self.base)
        a, b = self.glora_A(), self.glora_B()
        dw = w * a.to(w.dtype) + b.to(w.dtype)
        if dw.dim() < 2 or dw.shape != w.shape:  # constant/vector forms broadcast
            dw = dw.expand_as(w)
        if not self.has_bias:
            return dw, None
        bias = self.base.bias
        c, d, e = self.glora_C(), self.glora_D(), self.glora_E()
        db = bias * d.to(bias.dtype) + e.to(bias.dtype) + (w @ c.to(w.dtype)).squeeze(-1)
        return dw, db

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dw, db = self._updates()
        return base_out + F.linear(x.to(dw.dtype), dw, db).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        dw, db = self._updates()
        out = {"weight": layers.to_param_layout(self.base, dw)}
        if db is not None:
            out["bias"] = db
        return out


register("glora", GloraConfig, GloraDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
