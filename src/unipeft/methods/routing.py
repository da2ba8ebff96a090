"""Poly, MHR and MHR-mu (Ponti et al. 2023; Caccia et al. 2023): routing over an inventory of LoRA modules.

Every target holds `n_skills` LoRA pairs (A_k: r x d_in, B_k: d_out x r) and, per task, router
logits over them. A task's adapter is the weighted mix A = sum_k w_k A_k, B = sum_k w_k B_k with
w = sigmoid(logits) normalised to sum 1 (Poly's deterministic form). MHR splits the rank into
`n_splits` heads, each routed separately; MHR-mu drops the routers and uses the inventory's
average (uniform w), the form the MHR paper fine-tunes on new tasks. Task ids come with the call:
`model(**batch, task_ids=ids)` (one id per row; optional when n_tasks == 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.registry import Capabilities, register
from .adapters import layer_dims

ROUTINGS = ("poly", "mhr", "mhr_mu")


@dataclass
class PolyConfig(AdapterConfig):
    """Inventory of `n_skills` rank-`r` LoRA modules per target, routed per task (`n_tasks` routers).

    routing: "poly" (one head), "mhr" (`n_splits` heads over the rank), "mhr_mu" (no router: average)."""

    peft_type = "POLY_ROUTING"

    r: int = 8
    n_skills: int = 4
    n_tasks: int = 1
    n_splits: int = 1
    routing: str = "poly"

    def validate(self) -> None:
        super().validate()
        for name in ("r", "n_skills", "n_tasks", "n_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"PolyConfig.{name}: expected a positive integer, got {value!r}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"PolyConfig.routing: expected one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "poly" and self.n_splits != 1:
            raise ConfigError(f"PolyConfig.n_splits={self.n_splits}: Poly has one head; use routing='mhr' for heads")
        if self.r % self.n_splits:
            raise ConfigError(f"PolyConfig.r={self.r} must be divisible by n_splits={self.n_splits}")

    def resolve_for_model(self, model, targets) -> None:
        """One task-id holder per adapter, shared by its deltas (filled by the call's `task_ids`)."""
        self._task_state = _TaskState()


class _TaskState:
    """The current call's task ids; the first delta of the adapter reads them from the inputs."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None
        self.leader: Delta | None = None


class PolyDelta(Delta):
    """`lora_A` (skills, r, d_in), `lora_B` (skills, d_out, r), `router_logits` (tasks, splits, skills)."""

    model_input = True  # reads task_ids from the model call

    def __init__(self, base: nn.Module, config: PolyConfig, path: str) -> None:
        super().__init__(base, config, path)
        d_in, d_out = layer_dims(base)
        self.transposed = isinstance(base, Conv1D)
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
        state = getattr(config, "_task_state", None) or _TaskState()
        config._task_state = state
        object.__setattr__(self, "_state", state)
        if state.leader is None:
            object.__setattr__(state, "leader", self)

    def prepare_inputs(self, model, kwargs: dict):
        if self._state.leader is not self:
            return kwargs, None
        ids = kwargs.pop("task_ids", None)
        self._state.task_ids = None if ids is None else torch.as_tensor(ids)
        return kwargs, None

    def weights(self, batch: int, device) -> torch.Tensor:
        """(batch, rank, skills): each rank dimension's mixing weights for every row."""
        k, r = self.lora_A.shape[:2]
        if self.router_logits is None:  # MHR-mu: the inventory's average
            return torch.full((batch, r, k), 1.0 / k, device=device, dtype=self.lora_A.dtype)
        ids = self._state.task_ids
        if ids is None:
            if self.n_tasks != 1:
                raise ConfigError(f"Poly adapter at '{self.path}' routes over {self.n_tasks} tasks: pass "
                                  f"task_ids=<one id per row> in the model call")
            ids = torch.zeros(batch, dtype=torch.long)
        ids = ids.to(device).long()
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
        saved = self._state.task_ids
        self._state.task_ids = torch.tensor([task])
        try:
            w = self.weights(1, self.lora_A.device)[0]
        finally:
            self._state.task_ids = saved
        return torch.einsum("rk,krd->rd", w, self.lora_A), torch.einsum("rk,kor->or", w, self.lora_B)


register("poly", PolyConfig, Capabilities(mergeable=False, mixed_batch=False,
                                          layer_types=(nn.Linear, Conv1D)))(PolyDelta)
