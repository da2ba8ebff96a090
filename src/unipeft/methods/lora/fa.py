"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its initialisation; only B trains.

A training strategy of LoRA: the deltas compute plain LoRA and the saved folder is a PEFT "LORA"
folder. What differs:

  * A is a buffer of the delta, not a parameter: nothing (set_adapter, a trainer, a user's
    `requires_grad_`) can make it trainable, and `up.trainable_report` counts B only. It is
    still saved as `lora_A.weight`, so PEFT loads the folder as ordinary LoRA.
  * With A frozen, the backward needs only the r-wide activations A x for B's gradient, not the
    layer input: the delta skips the fused path (which keeps the input for A's gradient).
  * `lorafa_projection=True` (default) turns B's gradient into PEFT's LoRA-FA optimizer
    direction, g_B <- g_B (A A^T + 1e-8 I)^+ / s^2 (s = the site's scaling): a training
    callback applies it after clipping, before the optimizer step; plain loops use
    `create_lorafa_optimizer` (an AdamW that applies it in `step`) or `up.TrainingHooks`.

`lorafa_projection` is written into adapter_config.json so the folder reloads as "lora_fa"
(PEFT 0.21 warns about the key it does not know and ignores it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.errors import ConfigError, TargetError
from ...core.hooks import TrainContext, TrainerCallback
from ...core.registry import Capabilities, register
from .config import LoraConfig
from .deltas import LoraLinear


@dataclass
class LoraFAConfig(LoraConfig):
    """LoRA-FA: A stays at its init, only B trains (with PEFT's projected B gradient when `lorafa_projection`)."""

    lorafa_projection: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.lorafa_projection, bool):
            raise ConfigError(f"LoraFAConfig.lorafa_projection: expected True or False, got {self.lorafa_projection!r}")
        if self.use_dora and self.lorafa_projection:
            raise ConfigError("LoraFAConfig.use_dora: the LoRA-FA gradient projection assumes plain LoRA; "
                              "set lorafa_projection=False to train DoRA with a frozen A")
        if self.target_parameters:
            raise ConfigError(f"LoraFAConfig.target_parameters: LoRA-FA adapts layers only, got "
                              f"{self.target_parameters!r}; use LoraConfig for parameter targets")

    def training_callbacks(self, model: nn.Module, adapter_name: str) -> list[TrainerCallback]:
        """The B-gradient projection (when `lorafa_projection`)."""
        return [ProjectGradients(adapter_name)] if self.lorafa_projection else []


class LoraFALinear(LoraLinear):
    """A LoRA linear delta whose A is a frozen buffer (same keys and output as LoraLinear)."""

    def __init__(self, base: nn.Module, config: LoraFAConfig, path: str, bank=None, calibration=None) -> None:
        super().__init__(base, config, path, bank, calibration)
        frozen = self.lora_A.weight.detach()
        del self.lora_A.weight
        self.lora_A.register_buffer("weight", frozen)
        self.fuses = False  # the fused function keeps the input for A's gradient, which LoRA-FA never needs
        object.__setattr__(self, "_alone", [])

    @classmethod
    def create(cls, base: nn.Module, config: LoraFAConfig, path: str, bank=None, calibration=None) -> "LoraFALinear":
        if not layers.is_matrix_layer(base):
            raise TargetError(f"LoRA-FA supports Linear-like layers only; '{path}' is a {type(base).__name__}")
        return cls(base, config, path, bank, calibration)

    @classmethod
    def forward_grouped(cls, deltas, x, base_out, row_group):
        # LoraLinear's batched path decides on autograd from A, which never requires grad here.
        if torch.is_grad_enabled() and any(d is not None and d.lora_B.weight.requires_grad for d in deltas):
            return None
        return super().forward_grouped(deltas, x, base_out, row_group)


@torch.no_grad()
def project_b_gradients(model: nn.Module, adapter_name: str) -> int:
    """Replace each LoRA-FA B gradient of `adapter_name` by g (A A^T + 1e-8 I)^+ / s^2; returns how many."""
    done = 0
    for delta in model.deltas(adapter_name):
        if not isinstance(delta, LoraFALinear):
            continue
        b = delta.lora_B.weight
        if b.grad is None:
            continue
        a = delta.lora_A.weight.to(torch.float32)
        gram = a @ a.T + 1e-8 * torch.eye(a.shape[0], device=a.device)
        s = float(delta.scaling)
        b.grad.copy_((b.grad.to(torch.float32) @ torch.linalg.pinv(gram) / (s * s)).to(b.grad.dtype))
        done += 1
    return done


class ProjectGradients(TrainerCallback):
    """Applies `project_b_gradients` before each optimizer step (unless the optimizer already does)."""

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self._warned = False

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        if isinstance(ctx.optimizer, LoraFAOptimizer):
            return
        trains = any(d.lora_B.weight.requires_grad for d in ctx.model.deltas(self.adapter_name)
                     if isinstance(d, LoraFALinear))
        if not project_b_gradients(ctx.model, self.adapter_name) and trains and not self._warned:
            # e.g. a sharded (FSDP) model keeps the gradients in flat buffers, out of the deltas' reach
            self._warned = True
            warnings.warn(f"LoRA-FA adapter '{self.adapter_name}': no B gradient was found to project; "
                          f"training proceeds with the unprojected gradient", stacklevel=2)


class LoraFAOptimizer(torch.optim.AdamW):
    """AdamW that first projects the LoRA-FA B gradients of `model`'s adapters (see the module docstring)."""

    def __init__(self, model: nn.Module, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._adapters = [n for n, c in model.peft_config.items()
                          if isinstance(c, LoraFAConfig) and c.lorafa_projection]
        self._model = model

    def step(self, closure=None):
        for name in self._adapters:
            project_b_gradients(self._model, name)
        return super().step(closure)


def create_lorafa_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> LoraFAOptimizer:
    """AdamW over the trainable parameters with LoRA-FA's B-gradient projection, for plain loops (as
    PEFT's `create_lorafa_optimizer`; A is already frozen by the adapter itself)."""
    from ...core.model import AdaptedModel

    if not isinstance(model, AdaptedModel) or not any(isinstance(c, LoraFAConfig) for c in model.peft_config.values()):
        raise ConfigError("create_lorafa_optimizer: the model holds no LoraFAConfig adapter; adapt it with "
                          "up.LoraFAConfig(...)")
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(model, params, lr=lr, weight_decay=weight_decay, **kwargs)


LoraConfig.strategy_keys["lorafa_projection"] = LoraFAConfig
register("lora_fa", LoraFAConfig, LoraFALinear, Capabilities(mergeable=True, mixed_batch=True,
                                                             layer_types=layers.MATRIX_LAYERS, quantized_base=True,
                                                             peft_compatible=True),
         exports=(create_lorafa_optimizer, project_b_gradients))
