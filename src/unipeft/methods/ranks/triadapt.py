"""TriAdaptLoRA (Liang, Wang, Zeng 2025, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank
Adaptation"): a triangular split of the rank matrix, normalised Frobenius-norm importance and
threshold-driven rank growth.

out = base(x) + B (L + U) A x * alpha, with A (r x in), B (out x r) and the r x r rank matrix split
into its lower triangle L (diagonal included) and strictly upper triangle U, two parameters
stored packed (every stored entry is used; growth appends, see TriAdaptDelta). Init: L = I,
U = 0, B = 0 (the identity at init), A ~ N(0, 1/in).
Importance of a module: ||dW||_F / sqrt(out x in) (the Frobenius norm normalised by size), then
divided by the largest over the adapter's modules. Every deltaT steps after tinit, each module
whose normalised importance is >= the threshold tau(t) grows one rank (new L diagonal 1, new
B column 0: the output does not change), while the total rank stays <= budget and a module's
rank <= max_r. tau falls linearly from tau_start to tau_end over `growth_steps` steps (the
paper's linear threshold schedule). Ranks are recorded in `rank_pattern` (see core/resize.py).

Simplified from the paper: one growth per module per interval, only the linear threshold schedule,
the scale is the constant alpha, and the triangles are trained with the same optimizer settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import fraction, non_negative, positive_int, positive_number
from ...core.hooks import TrainerCallback
from ...core.resize import resize_param
from .importance import refuse_multi_process, resolved_budget
from .svd import LAYERS


@dataclass
class TriAdaptLoraConfig(AdapterConfig):
    """TriAdaptLoRA: triangular rank matrices, ranks grown where the normalised importance passes a threshold."""

    peft_type = "TRIADAPTLORA"

    # Total rank over all modules; None: 4 per targeted module (at least init_r), resolved at injection.
    budget: int | None = positive_int(None, optional=True)
    init_r: int = positive_int(1)
    max_r: int = positive_int(8)
    tinit: int = non_negative(0)
    deltaT: int = positive_int(10)
    growth_steps: int = positive_int(100)
    tau_start: float = fraction(0.9, "0 <= tau_start < 1")
    tau_end: float = fraction(0.3, "0 <= tau_end < 1")
    alpha: float = positive_number(1.0)
    dropout: float = fraction(0.0, "0 <= dropout < 1")
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.init_r > self.max_r:
            raise ConfigError(f"{name}.init_r: expected init_r <= max_r={self.max_r}, got {self.init_r}")
        if self.tau_end > self.tau_start:
            raise ConfigError(f"{name}.tau_end: the threshold falls, so tau_end <= tau_start={self.tau_start}, "
                              f"got {self.tau_end}")
        for key, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"{name}.rank_pattern[{key!r}]: expected a rank >= 1, got {r!r}")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"budget": resolved_budget(self, targets)}

    def rank_of(self, path: str) -> int:
        """The recorded rank of `path`, else init_r."""
        return self.rank_pattern.get(path, self.init_r)

    def threshold(self, step: int) -> float:
        """tau(step): linear from tau_start (at tinit) to tau_end (at tinit + growth_steps)."""
        t = min(1.0, max(0.0, (step - self.tinit) / self.growth_steps))
        return self.tau_start + (self.tau_end - self.tau_start) * t

    def training_callbacks(self, model, adapter_name: str) -> list:
        return [] if self.inference_mode else [ThresholdGrowth(model, adapter_name)]

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"init_r": 2, "budget": 3 * len(candidates), "max_r": 3, "deltaT": 1}


def _tril(r: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (row, col) indices of the lower triangle of an r x r matrix (below `offset`)."""
    idx = torch.tril_indices(r, r, offset)
    return idx[0], idx[1]


class TriAdaptDelta(Delta):
    """B M A on a matrix layer, M = L + U from two packed triangles.

    `lora_L` holds the lower triangle (diagonal included) row by row, r(r+1)/2 entries; `lora_U`
    the strictly upper triangle column by column, r(r-1)/2 entries. Together they are exactly
    the r x r entries of M (no stored entry is unused), and growing the rank by one appends
    (the new row of L, the new column of U) without moving an existing entry."""

    commutes = True

    def __init__(self, base: nn.Module, config: TriAdaptLoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not isinstance(base, LAYERS) or layers.is_quantized(base):
            raise TargetError(f"TriAdaptLoraConfig: '{path}' of type {type(base).__name__} is not supported")
        geo = layers.geometry(base)
        r = config.rank_of(path)
        self.scale = float(config.alpha)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, geo.in_features) / math.sqrt(geo.in_features))
        rows, cols = _tril(r)
        self.lora_L = nn.Parameter((rows == cols).to(torch.float32))  # M = I at init
        self.lora_U = nn.Parameter(torch.zeros(r * (r - 1) // 2))
        self.lora_B = nn.Parameter(torch.zeros(geo.out_features, r))

    @property
    def r(self) -> int:
        """The current rank."""
        return self.lora_A.shape[0]

    def rank_matrix(self) -> torch.Tensor:
        """The r x r matrix M from its two triangles."""
        r = self.r
        rows, cols = _tril(r)
        urows, ucols = _tril(r, -1)  # of U's transpose: U[ucols, urows]
        m = self.lora_L.new_zeros(r, r).index_put((rows, cols), self.lora_L)
        return m.index_put((ucols, urows), self.lora_U)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        return base_out + ((h @ self.rank_matrix().T @ self.lora_B.T) * self.scale).to(base_out.dtype)

    def dense(self) -> torch.Tensor:
        """dW (out x in)."""
        return self.lora_B @ self.rank_matrix() @ self.lora_A * self.scale

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.dense())}

    def importance(self) -> float:
        """||dW||_F / sqrt(out x in)."""
        with torch.no_grad():
            d = self.dense()
            return float(torch.linalg.matrix_norm(d) / math.sqrt(d.numel()))

    def grow(self, optimizer, generator: torch.Generator) -> None:
        """One more rank: a new A row ~ N(0, 1/in), B column 0, M's new row and column 0 but a diagonal 1
        (the output does not change); the optimizer's state grows with zeros."""
        r, n_in = self.r, self.lora_A.shape[1]
        fill = torch.randn(1, n_in, generator=generator) / math.sqrt(n_in)
        resize_param(self, "lora_A", 0, torch.arange(r), r + 1, optimizer, fill)
        resize_param(self, "lora_B", 1, torch.arange(r), r + 1, optimizer)
        new_row = torch.zeros(r + 1)
        new_row[-1] = 1.0
        resize_param(self, "lora_L", 0, torch.arange(self.lora_L.numel()), (r + 1) * (r + 2) // 2, optimizer, new_row)
        resize_param(self, "lora_U", 0, torch.arange(self.lora_U.numel()), (r + 1) * r // 2, optimizer)


class ThresholdGrowth(TrainerCallback):
    """Every deltaT steps after tinit: grow the modules whose normalised importance passes tau(step)."""

    def __init__(self, model, adapter_name: str) -> None:
        self.model, self.adapter = model, adapter_name

    def on_train_begin(self, ctx) -> None:
        refuse_multi_process(ctx, "TriAdaptLoraConfig")

    def on_step_end(self, ctx) -> None:
        cfg = self.model.peft_config[self.adapter]
        step = ctx.step
        if step <= cfg.tinit or (step - cfg.tinit) % cfg.deltaT:
            return
        deltas = {d.path: d for d in self.model.deltas(self.adapter) if isinstance(d, TriAdaptDelta)}
        if not any(d.lora_A.requires_grad for d in deltas.values()):
            return
        imp = {p: d.importance() for p, d in deltas.items()}
        top = max(imp.values(), default=0.0)
        if top <= 0:
            return
        left = cfg.budget - sum(d.r for d in deltas.values())
        tau = cfg.threshold(step)
        picks = sorted((p for p, d in deltas.items() if d.r < cfg.max_r and imp[p] / top >= tau),
                       key=lambda p: (-imp[p], p))[:max(0, left)]
        if not picks:
            return
        for i, p in enumerate(picks):
            deltas[p].grow(ctx.optimizer, torch.Generator().manual_seed(step * 1009 + i))
        pattern = {p: d.r for p, d in deltas.items()}
        self.model.replace_deltas(self.adapter, {p: deltas[p] for p in picks}, cfg.replace(rank_pattern=pattern))
