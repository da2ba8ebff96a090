"""Poly / MHR in PEFT's own "POLY" layout (Ponti et al. 2023; Caccia et al. 2023), read and written as PEFT does.

unipeft's native routing family (methods/routing.py, `up.PolyConfig`, type "POLY_ROUTING") splits the
rank into heads; PEFT's POLY splits the *features* instead, scales by 1/r and keeps one router per
layer. This module is that second form, with PEFT's tensors and key names, so PEFT POLY folders load
here and ours load in PEFT:

  poly_lora_A               (n_splits, n_skills, d_in / n_splits, r)
  poly_lora_B               (n_splits, n_skills, r, d_out / n_splits)
  poly_router.module_logits (n_tasks, n_splits * n_skills)

For a row of task t, split q mixes the skills with w_q = p_q / sum(p_q), where p = sigmoid(logits[t])
in eval mode and a relaxed-Bernoulli sample (temperature 1) of those logits in training mode (of the
base layer: `model.train()`), as in PEFT. The mixed A_q, B_q are concatenated over splits (A along d_in, B along d_out), and the site's
output becomes base(x) + x A B / r. Task ids come with the call (`model(**batch, task_ids=ids)`, one id
per row; optional when n_tasks == 1): a declared per-call input read from the forward context.

The config class is `PeftPolyConfig` (registry name "peft_poly") because `up.PolyConfig` already
names the native form; `unipeft.compat.PolyConfig` (PEFT's class name) builds this one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import choice, positive_int
from ..core.registry import Capabilities, register

EPS = 1e-12  # PEFT's guard in the normalisation of the mixing weights


@dataclass
class PeftPolyConfig(AdapterConfig):
    """PEFT's PolyConfig: `n_skills` rank-`r` LoRA pairs per nn.Linear, mixed per task by a router of
    `n_tasks` rows; `n_splits` > 1 routes each slice of the features separately (Multi-Head Routing)."""

    peft_type = "POLY"
    peft_class = "PolyConfig"
    not_in_peft = ("layers_to_transform", "layers_pattern")
    call_inputs = ("task_ids",)

    r: int = positive_int(8)
    init_weights: bool = True
    poly_type: str = choice("poly", ("poly",))
    n_tasks: int = positive_int(1)
    n_skills: int = positive_int(4)
    n_splits: int = positive_int(1)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"PeftPolyConfig.init_weights: expected True or False, got {self.init_weights!r}")

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Three skills of rank 2 (one split: any layer width divides)."""
        return {"r": 2, "n_skills": 3}


class PolyRouter(nn.Module):
    """One layer's router: `module_logits` (n_tasks, n_splits * n_skills), PEFT's key `poly_router.*`."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        """PEFT's init: logits uniform in (-1e-3, 1e-3), so every skill starts almost equally weighted."""
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor, sample: bool) -> torch.Tensor:
        """(batch, n_splits, n_skills) mixing weights summing to 1 over the skills of each split."""
        logits = self.module_logits[task_ids.to(self.module_logits.device)].view(-1, self.n_splits, self.n_skills)
        if sample:  # Poly's stochastic skill selection while training
            p = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            p = torch.sigmoid(logits)
        return p / (p.sum(dim=-1, keepdim=True) + EPS)


class PeftPolyDelta(Delta):
    """The skills and router of one nn.Linear, under PEFT's names (`poly_lora_A`, `poly_lora_B`, `poly_router`)."""

    def __init__(self, base: nn.Module, config: PeftPolyConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d_in, d_out = base.in_features, base.out_features
        q, k, r = config.n_splits, config.n_skills, config.r
        if d_in % q or d_out % q:
            raise ConfigError(f"PeftPolyConfig.n_splits={q}: '{path}' has in_features={d_in} and "
                              f"out_features={d_out}; both must be divisible by n_splits")
        self.r, self.n_tasks = r, config.n_tasks
        self.poly_lora_A = nn.Parameter(torch.empty(q, k, d_in // q, r))
        self.poly_lora_B = nn.Parameter(torch.empty(q, k, r, d_out // q))
        self.poly_router = PolyRouter(config.n_tasks, q, k)
        self._reset(config.init_weights)

    def _reset(self, init_weights: bool) -> None:
        """PEFT's init, in its order: each (skill, split) A like nn.Linear's weight; B zero (identity at
        init) or, with init_weights=False, like nn.Linear too; then the router."""
        with torch.no_grad():
            q, k, d, r = self.poly_lora_A.shape
            for skill in range(k):
                for split in range(q):
                    a = torch.empty(r, d)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    self.poly_lora_A[split, skill] = a.T
            if init_weights:
                self.poly_lora_B.zero_()
            else:
                out = self.poly_lora_B.shape[-1]
                for skill in range(k):
                    for split in range(q):
                        b = torch.empty(out, r)
                        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                        self.poly_lora_B[split, skill] = b.T
        self.poly_router.reset()

    def task_ids(self, batch: int) -> torch.Tensor:
        """This call's task id per row (all zeros when there is one task and none were given)."""
        ids = self.call_input("task_ids")
        if ids is None:
            if self.n_tasks != 1:
                raise ConfigError(f"Poly adapter at '{self.path}' routes over {self.n_tasks} tasks: pass "
                                  f"task_ids=<one id per row> in the model call")
            return torch.zeros(batch, dtype=torch.long)
        ids = torch.as_tensor(ids).long().reshape(-1)
        if ids.shape[0] != batch or int(ids.max()) >= self.n_tasks or int(ids.min()) < 0:
            raise ConfigError(f"task_ids: expected {batch} ids in [0, {self.n_tasks}) (one per row), "
                              f"got {ids.tolist()}")
        return ids

    def mixed(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: A (batch, d_in, r) and B (batch, r, d_out), the skills mixed by the router."""
        # The base layer's mode says whether the model trains: a fresh delta is in training mode even
        # when it was added to a model in eval mode, and must not sample there.
        w = self.poly_router(task_ids, sample=self.base.training)
        batch = w.shape[0]
        a = torch.einsum("bqs,qsdr->bqdr", w, self.poly_lora_A).reshape(batch, -1, self.r)
        b = torch.einsum("bqs,qsrd->bqrd", w, self.poly_lora_B).transpose(1, 2).reshape(batch, self.r, -1)
        return a, b

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        a, b = self.mixed(self.task_ids(batch))
        h = x.to(a.dtype).reshape(batch, -1, a.shape[1])  # (batch, tokens, d_in); 2-D inputs: one token
        y = h.bmm(a).bmm(b) / self.r
        return base_out + y.reshape(base_out.shape).to(base_out.dtype)


register("peft_poly", PeftPolyConfig, PeftPolyDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Linear,), peft_compatible=True))
