"""Lily (low-rank interconnected adaptation across layers): down projections shared by neighbouring layers,
up projections ("HP" experts) shared by all layers, mixed per layer by a router.

Targets are grouped by (the target name they match, weight shape), in model order. In a group, each run of
`stride_A` consecutive layers shares one A (in -> r), and all layers share one B whose weight
(num_B * r, out) stacks `num_B` up projections B_e (r, out), PEFT's storage. Each layer has its own
router (r -> num_B):

    h = A x;   p = mean over every token of the call of softmax(router(h));   out = base(x) + scaling * h (sum_e p_e B_e)

The expert weights are averaged over the whole batch, so a row's output depends on the other rows: no
mixed batches, and no weight-space form (not mergeable). B starts at zero (identity at init).

Sharing: the adapter's bank builds the modules once, before any delta, and hands each site its router
and the A / B of its group; the site's delta registers them as its own submodules `lily_A` / `lily_B` (one
module object reached from several sites, trained once). The bank itself holds no state, so the file has
exactly PEFT's keys: every site's lily_A.weight, lily_B.weight and lily_router.weight, shared ones
repeated (PEFT's layout); on load each copy is written into the one shared module, so a file whose
copies differ keeps the last one (PEFT loads it the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.fields import Rule, positive_int, ruled
from ...core.registry import Capabilities, register
from ._common import LINEAR, flag, kaiming_, up_init_


@dataclass
class LilyConfig(AdapterConfig):
    """Lily (PEFT's LilyConfig): rank r, one A per `stride_A` layers, `num_B` shared up projections per target."""

    peft_class = "LilyConfig"
    peft_type = "LILY"

    r: int = positive_int(32)
    stride_A: int = positive_int(1)
    num_B: int = ruled(2, Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
                               "an integer >= 2 (the router mixes at least two up projections)"))
    scaling: float = ruled(1.0, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                     "a number"))
    init_weights: bool = flag(True)

    def make_bank(self, model, targets) -> "LilyBank":
        return LilyBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "stride_A": 2, "num_B": 2}


def group_key(config: LilyConfig, path: str, module: nn.Module) -> tuple:
    """(the target name `path` matches, weight shape): layers that share A / B.

    PEFT takes a suffix of `target_modules` that the path ends with; the longest one here, so a path
    matching several names always gets the same group."""
    spec = config.target_modules
    if isinstance(spec, str) or spec is None:
        name = spec
    else:
        name = max((s for s in spec if path.endswith(s)), key=len, default=None)
    return name, tuple(module.weight.shape)


class LilyBank(Bank):
    """Every site's (A, B, router) by path, shared A / B included (kept out of the bank's state: sites save them).

    Drawn as PEFT draws them, site by site in model order (A, B and router built, then A and router
    re-drawn Kaiming-uniform and B zeroed), the copies a site does not keep included: the same seed
    gives PEFT's initial adapter."""

    def __init__(self, config: LilyConfig, targets) -> None:
        super().__init__()
        r, n_b = config.r, config.num_B
        leaders: dict[tuple, list[tuple[nn.Linear, nn.Linear]]] = {}  # group -> [(A, B)] of its members
        modules: dict[str, tuple[nn.Linear, nn.Linear, nn.Linear]] = {}
        for path, module in targets:
            a = nn.Linear(module.in_features, r, bias=False)
            b = nn.Linear(module.out_features, n_b * r, bias=False)
            router = nn.Linear(r, n_b, bias=False)
            with torch.no_grad():
                kaiming_(a.weight)
                kaiming_(router.weight)
            up_init_(b.weight, config.init_weights)
            members = leaders.setdefault(group_key(config, path, module), [])
            i = len(members)
            if i:  # B: the group's first; A: the first of each run of stride_A layers
                b = members[0][1]
                if i % config.stride_A:
                    a = members[i - i % config.stride_A][0]
            members.append((a, b))
            modules[path] = (a, b, router)
        object.__setattr__(self, "_by_path", modules)  # not submodules: each site registers its own view

    def modules_for(self, path: str) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(A, B, router) of the site at `path`."""
        return self._by_path[path]


class LilyDelta(Delta):
    """Lily at one Linear: the group's shared lily_A / lily_B and the site's own lily_router."""

    def __init__(self, base: nn.Module, config: LilyConfig, path: str, bank: LilyBank | None = None) -> None:
        super().__init__(base, config, path, bank)
        self.lily_A, self.lily_B, self.lily_router = bank.modules_for(path)
        self.num_B, self.scaling = config.num_B, config.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.lily_A(x.to(self.lily_A.weight.dtype))
        weights = F.softmax(self.lily_router(h), dim=-1).reshape(-1, self.num_B).mean(dim=0)  # whole call
        experts = self.lily_B.weight.reshape(self.num_B, -1, self.lily_B.weight.shape[1])  # (num_B, r, out)
        combined = torch.einsum("e,eio->io", weights, experts)
        return base_out + (self.scaling * (h @ combined)).to(base_out.dtype)


register("lily", LilyConfig, LilyDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=LINEAR, peft_compatible=True))
