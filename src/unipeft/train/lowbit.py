"""8-bit-state optimizers on bitsandbytes: AdamW8bit, PagedAdamW8bit, and GaLore with 8-bit moments.

bitsandbytes keeps Adam's two moments as uint8 codes with one fp32 scale per 256-value block
(blockwise dynamic quantisation), for tensors of at least `min_8bit_size` = 4096 elements;
smaller tensors (biases, norms) keep fp32 moments. Both optimizers run on CPU (bitsandbytes'
CPU kernels). Paging (unified memory that spills to host RAM) exists on CUDA only: on a CPU,
PagedAdamW8bit warns once ("Paged optimizers are not supported on CPU ...") and allocates
ordinary tensors, so it then computes exactly what AdamW8bit computes.

GaLoreAdamW8bit is GaLore (train/galore.py) with bitsandbytes' 8-bit moments of the projected
gradient (8-bit when the projected matrix has >= 4096 elements); unlike galore_torch's
GaLoreAdamW8bit it makes no CUDA calls. Its full-rank parameters take bitsandbytes' own step
(weight decay before the update; GaLore targets decay after it, as in the fp32 variant).
"""
from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch

from .galore import GaLoreMixin


def build_8bit(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (adamw8bit) or PagedAdamW8bit (paged_adamw8bit) over `groups`."""
    cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class GaLoreAdamW8bit(GaLoreMixin, bnb.optim.AdamW8bit):
    """GaLore AdamW whose moments (of projected gradients too) are bitsandbytes' 8-bit blockwise states."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        bnb.optim.AdamW8bit.__init__(self, params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        # bitsandbytes does this on its first step(); per-layer hooks may step before that
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
        self._setup()

    def _adam(self, group: dict[str, Any], where: tuple[int, int], sub: dict[str, Any],
              grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """bitsandbytes' Adam step on a zero tensor shaped like `grad`: it becomes the update itself."""
        gi, pi = where
        buf = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        buf.grad = grad.contiguous()
        self.state[buf] = sub  # bitsandbytes keys state by tensor; `sub` lives in the weight's state
        try:
            if "state1" not in sub:
                self.init_state(group, buf, gi, pi)
            self.prefetch_state(buf)
            self.update_step(group, buf, gi, pi)  # weight decay of a zero tensor is zero
        finally:
            del self.state[buf]
        return buf, -1.0

    def _plain(self, group: dict[str, Any], where: tuple[int, int], p: torch.Tensor) -> None:
        gi, pi = where
        if "state1" not in self.state[p]:
            self.init_state(group, p, gi, pi)
        self.prefetch_state(p)
        self.update_step(group, p, gi, pi)


class LayerwiseGaLoreAdamW8bit(GaLoreAdamW8bit):
    """GaLoreAdamW8bit whose target weights step in their gradient hooks (per_layer: true)."""

    steps_in_backward = True
