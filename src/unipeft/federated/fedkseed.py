"""FedKSeed (Qin et al. 2024): federated zeroth-order training where an update is a seed and a scalar.

Every node shares K candidate seeds. A local step picks one of them, estimates the projected gradient
g = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps) along that seed's direction z_k (MeZO's in-place
two-point estimate, train/zo.py) and applies theta -= lr g z_k. What the client sends is therefore K numbers:
the sum of -lr g of each seed over its steps (4 bytes each). The server averages those vectors (weighted
by examples) into the global coefficients c, and every node's adapter is exactly
theta_0 + sum_k c_k z_k, with theta_0 the adapter the run's seed initialises identically everywhere. The
downlink is c itself: a node rebuilds the global adapter from theta_0 and c, whether or not it took part in
the previous rounds.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..train.zo import ZerothOrderOptimizer, direction_seed


def candidate_seeds(k: int, run_seed: int) -> list[int]:
    """The K seeds every node derives from the run's seed."""
    return [direction_seed(run_seed, 0, 1, i) for i in range(k)]


class KSeedZO(ZerothOrderOptimizer):
    """MeZO whose step directions come from a fixed pool of seeds; `coefficients` records -lr g per seed."""

    name = "fedkseed"

    def __init__(self, params: Iterable[Any], pool: list[int], lr: float = 1e-3, eps: float = 1e-3,
                 choice_seed: int = 0) -> None:
        super().__init__(params, lr=lr, weight_decay=0.0, eps=eps, perturbations=1, seed=0)
        self.pool = pool
        self.choices = np.random.default_rng(choice_seed)
        self.current = 0
        self.coefficients = torch.zeros(len(pool), dtype=torch.float64)

    def _seed(self, perturbation: int, tensor: int) -> int:
        return direction_seed(self.pool[self.current], 0, 0, tensor)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.current = int(self.choices.integers(len(self.pool)))
        return super().step(closure)

    def _update(self, tensors, grads, masks) -> None:
        super()._update(tensors, grads, masks)
        self.coefficients[self.current] -= self.param_groups[0]["lr"] * grads[0]

    @torch.no_grad()
    def replay(self, coefficients: torch.Tensor) -> None:
        """theta += sum_k c_k z_k over the pool (the seeds with c_k == 0 are skipped)."""
        tensors = self._tensors()
        for k in torch.nonzero(coefficients).flatten().tolist():
            self.current = k
            for i, _, p in tensors:
                p.add_(self._direction(p, self._seed(0, i)), alpha=float(coefficients[k]))


def build_kseed(model: torch.nn.Module, lr: float, eps: float, pool: list[int], choice_seed: int = 0) -> KSeedZO:
    """A KSeedZO over the model's trainable parameters, in named_parameters order (the same on every node)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return KSeedZO(params, pool, lr=lr, eps=eps, choice_seed=choice_seed)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of an adapter's bytes (nodes check they start from the same theta_0)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
