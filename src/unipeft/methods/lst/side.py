"""The side network of Ladder Side-Tuning (Sung et al., 2022), with SHERL's consolidation (Diao et al., 2024).

With h_i the detached output of the i-th feeding block (width d) and k = d // reduction_factor:

  z_i = D_i h_i                                            (down-projection d -> k, one per rung)
  s_1 = B_1(z_1)
  s_i = B_i(mu_i z_i + (1 - mu_i) s_{i-1}),  mu_i = sigmoid(alpha_i / T)   (LST's gate: alpha_i = 0, T = 0.1)
  B(u) = u + W_2 GELU(W_1 LN(u))                           (the side block: LayerNorm + MLP of width k)
  out  = y + U s_n                                         (U: k -> d, zero at init; y = the receiver's output)

so a fresh adapter is exactly the base, and no trainable tensor is on the backbone's path: the backbone runs
without autograd and saves nothing for backward; gradients stop at the detached h_i.

SHERL (sherl=True), its early route's anti-redundancy consolidation (as SHERL's published implementation computes it): the
rungs but the last form the early route; their side features e_j = B_j(z_j) are shallow (j < m) or the guide
g = e_m (the last early rung). Per position,
  r_j = sum_{l < m} relu(cos(e_j, e_l))                    (how much e_j repeats the shallow features, itself included)
  a_j = relu(v . (e_j * g) + b) / r_j,   w_j = a_j / (sum_l a_l + 1e-6)      (v, b: a learned k -> 1 scoring)
  c   = g + sum_{j < m} w_j e_j
and the last rung continues the gated ladder from c: s_n = B_n(mu_n z_n + (1 - mu_n) c). (SHERL then runs c
through the backbone's last layer, which backpropagation enters; here the side network's output is added
before the head as in LST, so it does not. Its early features also include the embeddings' output, which the
ladder does not read.) It needs at least three feeding layers. The side network is position-wise (no
attention), so it gives the same result with or without a KV cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.bank import Bank
from ...core.delta import Delta
from .plan import LadderPlan, LstConfig

GATE_TEMPERATURE = 0.1  # LST: mu_i = sigmoid(alpha_i / T)


class SideBlock(nn.Module):
    """u + W_2 GELU(W_1 LN(u)) at width k."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(k)
        self.fc1 = nn.Linear(k, k)
        self.fc2 = nn.Linear(k, k)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.fc2(F.gelu(self.fc1(self.norm(u))))


class Rung(nn.Module):
    """One ladder step: the down-projection of a block's output, its gate (if it mixes) and its side block."""

    def __init__(self, d: int, k: int, gated: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d, k)
        self.block = SideBlock(k)
        if gated:
            self.gate = nn.Parameter(torch.zeros(()))  # alpha_i = 0: mu_i = 0.5


def anti_redundancy_weights(shallow: torch.Tensor, guide: torch.Tensor, score: nn.Linear) -> torch.Tensor:
    """SHERL's weights w (..., m-1) of the shallow features (..., m-1, k) given the guide (..., k)."""
    unit = F.normalize(shallow, dim=-1, eps=1e-6)
    redundancy = torch.relu(unit @ unit.transpose(-1, -2)).sum(-1)  # (..., m-1); >= 1 (each with itself)
    attn = torch.relu(score(shallow * guide.unsqueeze(-2)).squeeze(-1)) / redundancy
    return attn / (attn.sum(-1, keepdim=True) + 1e-6)


def consolidate(early: list[torch.Tensor], score: nn.Linear) -> torch.Tensor:
    """c = g + sum_j w_j e_j over SHERL's early side features (the last one is the guide g)."""
    shallow, guide = torch.stack(early[:-1], -2), early[-1]
    w = anti_redundancy_weights(shallow, guide, score)
    return guide + (w.unsqueeze(-1) * shallow).sum(-2)


class LstBank(Bank):
    """The side network of one adapter and its per-call state (the running side state, SHERL's early outputs)."""

    def __init__(self, plan: LadderPlan, config: LstConfig) -> None:
        super().__init__()
        n = len(plan.rungs)
        self.early = n - 1 if config.sherl else 0  # the plan checked n >= 3 for SHERL
        d, k = plan.width, plan.side_width
        # A rung mixes the previous side state through its gate, except the first and SHERL's early ones.
        self.rungs = nn.ModuleList(Rung(d, k, gated=i > 0 and i >= self.early) for i in range(n))
        if self.early:
            self.sherl_score = nn.Linear(k, 1)
        self.up = nn.Linear(k, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        object.__setattr__(self, "order", {p: i for i, p in enumerate(plan.rungs)})
        object.__setattr__(self, "receiver", plan.receiver)
        self._reset()

    def _reset(self) -> None:
        object.__setattr__(self, "_state", None)
        object.__setattr__(self, "_early", [])

    def feed(self, index: int, hidden: torch.Tensor) -> None:
        """Advance the side state with rung `index`'s detached block output (rung 0 starts a new call)."""
        rung = self.rungs[index]
        if index == 0:
            self._reset()
        elif self._state is None and not self._early:
            raise RuntimeError(f"LST: rung {index} ran before rung 0 in this call; the ladder's blocks must run in "
                               f"model order")
        z = rung.down(hidden.to(rung.down.weight.dtype))
        if index < self.early:  # SHERL's early route: collect, consolidate at its last rung
            self._early.append(rung.block(z))
            if index == self.early - 1:
                object.__setattr__(self, "_state", consolidate(self._early, self.sherl_score))
                object.__setattr__(self, "_early", [])
            return
        if index == 0:
            state = rung.block(z)
        else:
            mu = torch.sigmoid(rung.gate / GATE_TEMPERATURE)
            state = rung.block(mu * z + (1 - mu) * self._state)
        object.__setattr__(self, "_state", state)

    def emit(self, out: torch.Tensor) -> torch.Tensor:
        """The receiver's output plus the up-projected side state (which is then released)."""
        state = self._state
        if state is None:
            raise RuntimeError("LST: the receiving site ran before any feeding block in this call")
        self._reset()
        return out + self.up(state).to(out.dtype)


class LstDelta(Delta):
    """A read-only tap at a feeding block (returns its output unchanged), the adder at the receiver, or both;
    a default site outside the plan (a block of another module list) passes its output through."""

    def __init__(self, base: nn.Module, config: LstConfig, path: str, bank: LstBank | None = None) -> None:
        super().__init__(base, config, path, bank)
        self.rung = bank.order.get(path, -1)
        self.receives = bank.receiver == path

    def forward(self, x, base_out):
        if self.rung < 0 and not self.receives:
            return base_out
        hidden = base_out[0] if isinstance(base_out, tuple) else base_out  # blocks may return (hidden, ...)
        if self.rung >= 0:
            self.bank.feed(self.rung, hidden.detach())
        if not self.receives:
            return base_out
        new = self.bank.emit(hidden)
        return (new, *base_out[1:]) if isinstance(base_out, tuple) else new
