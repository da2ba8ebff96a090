"""SoRA (Ding et al. 2023, "Sparse Low-rank Adaptation"): a gate vector between A and B, sparsified by a
proximal L1 step, so ranks whose gate reaches zero can be dropped.

out = base(x) + B (g * (A x)) * alpha / r. After each optimizer step the gate takes the proximal
step of the L1 penalty sparse_lambda * ||g||_1 with the learning rate of its parameter group:
g <- sign(g) * max(|g| - lr * sparse_lambda, 0) (the paper's soft-thresholding update; the
gate's gradient step itself is the trainer's optimizer, where the paper uses plain SGD).
`export_sora_lora(model, directory)` writes a plain LoRA folder (peft_type LORA) with the
zero-gate ranks dropped and gate and scaling folded into B: per-module ranks in rank_pattern,
alpha_pattern = rank so LoRA's scaling is 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import fraction, non_negative, positive_int, positive_number
from ...core.hooks import TrainerCallback
from ...core.state import WEIGHTS_NAME
from ..lora.config import LoraConfig
from .svd import LAYERS


@dataclass
class SoraConfig(AdapterConfig):
    """SoRA: LoRA of maximum rank r with a learned gate per rank, pruned by a proximal L1 step."""

    peft_type = "SORA"

    r: int = positive_int(8)
    alpha: float = positive_number(8.0)
    dropout: float = fraction(0.0, "0 <= dropout < 1")
    sparse_lambda: float = non_negative(1e-3)

    def training_callbacks(self, model, adapter_name: str) -> list:
        return [] if self.inference_mode else [GateProximal(model, adapter_name, self.sparse_lambda)]

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "alpha": 4}


class SoraDelta(Delta):
    """LoRA with a gate: A (r x in, Kaiming-uniform), gate (r, ones), B (out x r, zeros)."""

    commutes = True

    def __init__(self, base: nn.Module, config: SoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not isinstance(base, LAYERS) or layers.is_quantized(base):
            raise TargetError(f"SoraConfig: '{path}' of type {type(base).__name__} is not supported")
        geo = layers.geometry(base)
        self.scaling = config.alpha / config.r
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.r, geo.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_gate = nn.Parameter(torch.ones(config.r))
        self.lora_B = nn.Parameter(torch.zeros(geo.out_features, config.r))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        return base_out + (((h * self.lora_gate) @ self.lora_B.T) * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        dense = (self.lora_B * self.lora_gate) @ self.lora_A * self.scaling
        return {"weight": layers.to_param_layout(self.base, dense)}

    def live_ranks(self) -> list[int]:
        """Indices of the ranks whose gate is not zero."""
        return torch.nonzero(self.lora_gate.detach() != 0).view(-1).tolist()


class GateProximal(TrainerCallback):
    """After each optimizer step: soft-threshold every gate by lr * sparse_lambda."""

    def __init__(self, model, adapter_name: str, sparse_lambda: float) -> None:
        self.model, self.adapter, self.lam = model, adapter_name, sparse_lambda

    def on_step_end(self, ctx) -> None:
        gates = {id(d.lora_gate): d.lora_gate for d in self.model.deltas(self.adapter) if isinstance(d, SoraDelta)}
        with torch.no_grad():
            for group in ctx.optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in gates and p.requires_grad:
                        step = group["lr"] * self.lam
                        p.copy_(torch.sign(p) * torch.clamp(p.abs() - step, min=0.0))


def export_sora_lora(model, directory: str | Path, adapter_name: str = "default") -> LoraConfig:
    """Write adapter `adapter_name` as a plain LoRA folder (ranks with zero gate dropped, gate folded into B)."""
    cfg = model.peft_config.get(adapter_name)
    if not isinstance(cfg, SoraConfig):
        raise ConfigError(f"export_sora_lora: adapter '{adapter_name}' is not a SoRA adapter")
    tensors, ranks = {}, {}
    deltas = [d for d in model.deltas(adapter_name) if isinstance(d, SoraDelta)]
    if len(deltas) != len(model.deltas(adapter_name)):
        raise ConfigError(f"export_sora_lora: adapter '{adapter_name}' has modules_to_save; export writes the "
                          f"LoRA part only, so save the full copies separately or drop modules_to_save")
    for d in deltas:
        keep = d.live_ranks() or [0]  # LoRA needs rank >= 1: a dead module keeps one zero rank
        with torch.no_grad():
            a = d.lora_A[keep].detach().clone()
            b = (d.lora_B[:, keep] * d.lora_gate[keep] * d.scaling).detach().clone()
        prefix = f"{LoraConfig.state_prefix}{d.path}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        ranks[d.path] = len(keep)
    if not ranks:
        raise ConfigError(f"export_sora_lora: adapter '{adapter_name}' has no deltas")
    r = max(ranks.values())
    # Full paths as pattern keys select exactly one module each; alpha = rank makes LoRA's scaling 1.
    lora = LoraConfig(target_modules=sorted(ranks), r=r, alpha=float(r), dropout=cfg.dropout,
                      rank_pattern={p: k for p, k in ranks.items() if k != r},
                      alpha_pattern={p: float(k) for p, k in ranks.items() if k != r},
                      fan_in_fan_out=any(layers.is_transposed(d.base) for d in deltas),
                      base_model_name_or_path=cfg.base_model_name_or_path, task_type=cfg.task_type)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora.save(directory)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return lora
