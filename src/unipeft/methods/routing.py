"""Poly, MHR and MHR-mu (Ponti et al. 2023; Caccia et al. 2023): routing over an inventory of LoRA modules.

Every target holds `n_skills` LoRA pairs (A_k: r x d_in, B_k: d_out x r) and, per task, router
logits over them. A task's adapter is the weighted mix A = sum_k w_k A_k, B = sum_k w_k B_k with
w = sigmoid(logits) normalised to sum 1 (Poly's deterministic form). MHR splits the rank into
`n_splits` heads, each routed separately; MHR-mu drops the routers and uses the inventory's
average (uniform w), the form the MHR paper fine-tunes on new tasks. Task ids come with the call:
`model(**batch, task_ids=ids)` (one id per row; optional when n_tasks == 1): `task_ids` is a
declared per-call input, so the model takes it out of the call and every site's delta reads
it from the forward context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import choice, positive_int
from ..core.registry import Capabilities, register
from .adapters import layer_dims

ROUTINGS = ("poly", "mhr", "mhr_mu")


@dataclass
class PolyConfig(AdapterConfig):
    """Inventory of `n_skills` rank-`r` LoRA modules per target, routed per task (`n_tasks` routers).

    routing: "poly" (one head), "mhr" (`n_splits` heads over the rank), "mhr_mu" (no router: average)."""

    peft_type = "POLY_ROUTING"
    call_inputs = ("task_ids",)

    r: int = positive_int(8)
    n_skills: int = positive_int(4)
    n_tasks: int = positive_int(1)
    n_splits: int = positive_int(1)
    routing: str = choice("poly", ROUTINGS)

    def validate(self) -> None:
        super().validate()
        if self.routing == "poly" and self.n_splits != 1:
            raise ConfigError(f"PolyConfig.n_splits={self.n_splits}: Poly has one head; use routing='mhr' for heads")
        if self.r % self.n_splits:
            raise ConfigError(f"PolyConfig.r={self.r} must be divisible by n_splits={self.n_splits}")



class PolyDelta(Delta):
    """`lora_A` (skills, r, d_in), `lora_B` (skills, d_out, r), `router_logits` (tasks, splits, skills)."""

    def __init__(self, base: nn.Module, config: PolyConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d_in, d_out = layer_dims(base)
        k, r = config.n_skills, config.r
        self.n_tasks, self.n_splits = config.n_tasks, config.n_splits if config.routing == "mhr" else 1
        self.lora_A = nn.Parameter(torch.empty(k, r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(k, d_out, r))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if config.routing == "mhr_mu":
            self.router_logits = None
        else:
            self.router_logits = nn.Parameter(torch.empty(config.n_tasks, self.n_splits, k).uniform_(-1e-3, 1e-3))
        self._task_override: torch.Tensor | None = None  # set by mixed() for inspection

    def weights(self, batch: int, device) -> torch.Tensor:
        """(batch, rank, skills): each rank dimension's mixing weights for every row."""
        k, r = self.lora_A.shape[:2]
        if self.router_logits is None:  # MHR-mu: the inventory's average
            return torch.full((batch, r, k), 1.0 / k, device=device, dtype=self.lora_A.dtype)
        ids = self._task_override if self._task_override is not None else self.call_input("task_ids")
        if ids is None:
            if self.n_tasks != 1:
                raise ConfigError(f"Poly adapter at '{self.path}' routes over {self.n_tasks} tasks: pass "
                                  f"task_ids=<one id per row> in the model call")
            ids = torch.zeros(batch, dtype=torch.long)
        ids = torch.as_tensor(ids).to(device).long()
        if ids.shape != (batch,) or int(ids.max()) >= self.n_tasks or int(ids.min()) < 0:
            raise ConfigError(f"task_ids: expected {batch} ids in [0, {self.n_tasks}), got {ids.tolist()}")
        w = torch.sigmoid(self.router_logits[ids])  # (batch, splits, skills)
        w = w / (w.sum(-1, keepdim=True) + 1e-12)
        return w.repeat_interleave(r // self.n_splits, dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w = self.weights(x.shape[0], x.device)
        a = torch.einsum("brk,krd->brd", w, self.lora_A)
        b = torch.einsum("brk,kor->bor", w, self.lora_B)
        h = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        y = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return base_out + y.reshape(base_out.shape).to(base_out.dtype)

    def mixed(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task `task`'s (A, B) pair (for inspection and tests)."""
        self._task_override = torch.tensor([task])
        try:
            w = self.weights(1, self.lora_A.device)[0]
        finally:
            self._task_override = None
        return torch.einsum("rk,krd->rd", w, self.lora_A), torch.einsum("rk,kor->or", w, self.lora_B)


register("poly", PolyConfig, PolyDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=layers.MATRIX_LAYERS, quantized_base=True))
