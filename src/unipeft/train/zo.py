"""Zeroth-order optimizers (optimizer names mezo, sparse_mezo, spsa_gc): training from forward passes only.

Each step estimates the gradient from the loss at two points symmetric around the weights (SPSA):
g = (L(theta + eps d) - L(theta - eps d)) / (2 eps) along a random direction d, so no autograd graph,
no .grad and (for MeZO) no per-parameter state is ever held: memory is that of inference.

- MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): d = z ~ N(0, I),
  perturbed in place (+eps, -2 eps, +eps restores) and regenerated for the update
  theta -= lr * (g z + weight_decay * theta). z is never stored: every tensor draws it from its own
  torch.Generator seeded from (run seed, step, perturbation, tensor index).
- Sparse MeZO (Liu et al. 2024): the same, restricted to a mask per tensor of the entries whose magnitude
  is among its smallest `sparse_fraction` share (|theta| <= the share's quantile, ties included). The mask
  is recomputed at every step from the current weights (the paper's dynamic mask), once before the first
  perturbation, so perturb/restore/update of one step use the same entries; it lives for that step only
  (one byte per trainable entry). Entries outside the mask, weight decay included, are never written.
- SPSA-GC (Oh et al. 2023, BlackVIP): SPSA with Nesterov-style gradient correction. The estimate is taken
  at the look-ahead point theta - momentum * m, then m = momentum * m + lr * g_hat and theta -= m. As in
  BlackVIP, d has entries drawn from the segmented uniform [-1, -0.5) U [0.5, 1) and the estimate divides
  by them (g_hat = g / d, classic SPSA); the run's lr schedule and a constant eps take the place of
  SPSA's decaying gain sequences. The buffer m is per-parameter optimizer state.

`perturbations` > 1 averages that many estimates (one seed each) taken at the same point. The run seed
and the step counter are in state_dict, so a resumed run draws the same directions as an uninterrupted one.
Forward passes run with the model in eval mode (as MeZO does): both losses of a step then differ only by
the perturbation, never by dropout. Gradient clipping (max_grad_norm) does not apply: there is no gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError

_MASK64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """One round of splitmix64: neighbouring inputs (steps, tensors) give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seed(seed: int, step: int, perturbation: int, tensor: int) -> int:
    """The generator seed of one tensor's direction at one step and perturbation."""
    x = _splitmix(seed & _MASK64)
    for part in (step, perturbation, tensor):
        x = _splitmix(x ^ (part & _MASK64))
    return x >> 1  # torch.Generator.manual_seed takes it whatever its sign bit; keep it plainly positive


def check_fraction(value: Any) -> float:
    """optimizer.zo.sparse_fraction, checked: 0 < fraction <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"optimizer.zo.sparse_fraction: expected 0 < fraction <= 1 (the share of each tensor, "
                          f"smallest by magnitude, that is trained), got {value!r}")
    return float(value)


def check_momentum(value: Any) -> float:
    """optimizer.zo.momentum, checked: 0 <= momentum < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"optimizer.zo.momentum: expected 0 <= momentum < 1, got {value!r}")
    return float(value)


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base of the forward-only optimizers: `step(closure)` with closure() -> mean loss (0-dim, no graph)."""

    forward_only = True
    name = "zeroth_order"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, eps: float = 1e-3,
                 perturbations: int = 1, seed: int | None = None) -> None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ConfigError(f"optimizer.zo.eps: expected a positive number (the perturbation scale), got {eps!r}")
        if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 1:
            raise ConfigError(f"optimizer.zo.perturbations: expected an integer >= 1 (SPSA estimates averaged "
                              f"per step), got {perturbations!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ConfigError(f"optimizer.name={self.name}: the model has no trainable tensor (no parameter with "
                              f"requires_grad); check the method section")
        self.eps, self.perturbations = float(eps), perturbations
        # torch.initial_seed() is the run's seed (train_run seeds torch before building the model), the same
        # in every process, so every process draws the same directions without communicating.
        self.seed = int(torch.initial_seed() if seed is None else seed) & _MASK64
        self.steps = 0

    # ---- what subclasses change -------------------------------------------------------------------
    def _direction(self, p: torch.Tensor, seed: int) -> torch.Tensor:
        """The random direction of tensor `p` for `seed` (standard normal; SPSA-GC overrides)."""
        gen = torch.Generator(device=p.device).manual_seed(seed)
        return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)

    def _masks(self) -> dict[int, torch.Tensor]:
        """{tensor index: bool mask of the entries this step may touch}; none (every entry) by default."""
        return {}

    def _to_estimate_point(self, tensors: list[tuple[int, dict[str, Any], torch.Tensor]]) -> None:
        """Move the weights to where the gradient is estimated (they are there already, except in SPSA-GC)."""

    def _update(self, tensors: list[tuple[int, dict[str, Any], torch.Tensor]], grads: list[float],
                masks: dict[int, torch.Tensor]) -> None:
        """MeZO's update: theta -= lr * (mean_j g_j z_j + weight_decay * theta), z_j regenerated."""
        n = len(grads)
        for i, group, p in tensors:
            lr, wd, mask = group["lr"], group["weight_decay"], masks.get(i)
            if wd:  # on the weights before this update, as MeZO applies it
                p.sub_(p if mask is None else p * mask, alpha=lr * wd)
            for j, g in enumerate(grads):
                p.sub_(self._masked(self._direction(p, self._seed(j, i)), mask), alpha=lr * g / n)

    # ---- shared machinery ---------------------------------------------------------------------------------
    def _tensors(self) -> list[tuple[int, dict[str, Any], torch.Tensor]]:
        """(stable index, group, tensor) of every trainable tensor; the index keys its direction seed."""
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    out.append((i, group, p))
                i += 1
        return out

    def _seed(self, perturbation: int, tensor: int) -> int:
        return direction_seed(self.seed, self.steps, perturbation, tensor)

    @staticmethod
    def _masked(d: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return d if mask is None else d.mul_(mask)

    def _perturb(self, tensors: list[tuple[int, dict[str, Any], torch.Tensor]], j: int, scale: float,
                 masks: dict[int, torch.Tensor]) -> None:
        """theta += scale * eps * d_j in place, one tensor's direction alive at a time."""
        for i, _, p in tensors:
            p.add_(self._masked(self._direction(p, self._seed(j, i)), masks.get(i)), alpha=scale * self.eps)

    def _estimate(self, closure: Callable[[], torch.Tensor], tensors: list[tuple[int, dict[str, Any], torch.Tensor]],
                  masks: dict[int, torch.Tensor]) -> tuple[list[float], float]:
        """Projected gradients g_j = (L+ - L-) / (2 eps) of every perturbation, and the mean of all losses."""
        grads, total = [], 0.0
        for j in range(self.perturbations):
            self._perturb(tensors, j, +1.0, masks)
            plus = float(closure())
            self._perturb(tensors, j, -2.0, masks)
            minus = float(closure())
            self._perturb(tensors, j, +1.0, masks)  # back to theta
            grads.append((plus - minus) / (2.0 * self.eps))
            total += plus + minus
        return grads, total / (2 * self.perturbations)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One forward-only step; returns the mean of the perturbed losses (an O(eps^2) estimate of L(theta))."""
        if closure is None:
            raise TypeError(f"{type(self).__name__}.step needs a closure returning the batch's mean loss")
        tensors = self._tensors()
        self._to_estimate_point(tensors)
        masks = self._masks()
        grads, loss = self._estimate(closure, tensors, masks)
        self._update(tensors, grads, masks)
        self.steps += 1
        return torch.tensor(loss, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the run seed and step counter (the directions of later steps)."""
        out = super().state_dict()
        out["zeroth_order"] = {"seed": self.seed, "steps": self.steps}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        state_dict = dict(state_dict)
        counters = state_dict.pop("zeroth_order", None)
        super().load_state_dict(state_dict)
        if counters is not None:
            self.seed, self.steps = int(counters["seed"]), int(counters["steps"])


class MeZO(ZerothOrderOptimizer):
    """MeZO: in-place SPSA with Gaussian directions regenerated from seeds (ZO-SGD at inference memory)."""

    name = "mezo"


class SparseMeZO(ZerothOrderOptimizer):
    """Sparse MeZO: MeZO on each tensor's smallest-magnitude `sparse_fraction` share, re-chosen every step."""

    name = "sparse_mezo"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, eps: float = 1e-3,
                 perturbations: int = 1, seed: int | None = None, sparse_fraction: float = 0.25) -> None:
        fraction = check_fraction(sparse_fraction)
        super().__init__(params, lr, weight_decay, eps, perturbations, seed)
        self.sparse_fraction = fraction

    def _masks(self) -> dict[int, torch.Tensor]:
        """Per tensor: |theta| <= the k-th smallest magnitude, k = ceil(fraction * numel), from the weights now."""
        masks = {}
        for i, _, p in self._tensors():
            if self.sparse_fraction >= 1.0:
                continue
            mag = p.detach().abs()
            k = max(1, math.ceil(self.sparse_fraction * mag.numel()))
            threshold = mag.flatten().kthvalue(k).values
            masks[i] = mag <= threshold
        return masks


class SpsaGC(ZerothOrderOptimizer):
    """SPSA-GC: SPSA estimated at the Nesterov look-ahead point, with a momentum buffer per tensor."""

    name = "spsa_gc"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, eps: float = 1e-3,
                 perturbations: int = 1, seed: int | None = None, momentum: float = 0.9) -> None:
        beta = check_momentum(momentum)
        super().__init__(params, lr, weight_decay, eps, perturbations, seed)
        self.momentum = beta

    def _direction(self, p: torch.Tensor, seed: int) -> torch.Tensor:
        """Entries from the segmented uniform [-1, -0.5) U [0.5, 1) (BlackVIP): never near 0, so 1/d is bounded."""
        gen = torch.Generator(device=p.device).manual_seed(seed)
        v = torch.rand(p.shape, generator=gen, dtype=p.dtype, device=p.device).mul_(2.0).sub_(1.0)  # [-1, 1)
        return torch.where(v < 0, v * 0.5 - 0.5, v * 0.5 + 0.5)

    def _to_estimate_point(self, tensors: list[tuple[int, dict[str, Any], torch.Tensor]]) -> None:
        """The look-ahead point theta - momentum * m (Nesterov): the gradient is estimated there."""
        for _, _, p in tensors:
            buf = self.state[p].get("momentum_buffer")
            if buf is not None and self.momentum:
                p.sub_(buf, alpha=self.momentum)

    def _update(self, tensors: list[tuple[int, dict[str, Any], torch.Tensor]], grads: list[float],
                masks: dict[int, torch.Tensor]) -> None:
        """g_hat = mean_j g_j / d_j (+ weight_decay * theta at the look-ahead); m = beta m + lr g_hat; theta -= m."""
        beta, n = self.momentum, len(grads)
        for i, group, p in tensors:
            g_hat = torch.zeros_like(p)
            for j, g in enumerate(grads):
                g_hat.add_(self._direction(p, self._seed(j, i)).reciprocal_(), alpha=g / n)
            if group["weight_decay"]:
                g_hat.add_(p, alpha=group["weight_decay"])
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p)
            elif beta:
                p.add_(buf, alpha=beta)  # back from the look-ahead point to theta
            buf.mul_(beta).add_(g_hat, alpha=group["lr"])
            p.sub_(buf)


OPTIMIZERS: dict[str, type[ZerothOrderOptimizer]] = {"mezo": MeZO, "sparse_mezo": SparseMeZO, "spsa_gc": SpsaGC}


def build_zo(model: nn.Module, groups: list[dict[str, Any]], cfg: Any) -> ZerothOrderOptimizer:
    """The zeroth-order optimizer `cfg.name` over `groups` (ConfigError for a bad optimizer.zo field)."""
    from .fsdp import is_fsdp

    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer {cfg.name!r}; zeroth-order ones are {sorted(OPTIMIZERS)}")
    if is_fsdp(model):
        raise ConfigError(f"optimizer.name={cfg.name}: zeroth-order steps perturb whole tensors in place; run them "
                          f"with distributed.strategy: ddp (every process holds the whole model), not fsdp")
    zo = cfg.zo
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "eps": zo.eps,
                              "perturbations": zo.perturbations}
    # Every field is checked whichever optimizer uses it: a bad value is reported, never silently ignored.
    check_fraction(zo.sparse_fraction)
    check_momentum(zo.momentum)
    if cfg.name == "sparse_mezo":
        kwargs["sparse_fraction"] = zo.sparse_fraction
    if cfg.name == "spsa_gc":
        kwargs["momentum"] = zo.momentum
    trainable = [g for g in groups if any(p.requires_grad for p in g["params"])]
    if not trainable:
        raise ConfigError(f"optimizer.name={cfg.name}: the model has no trainable tensor (no parameter with "
                          f"requires_grad); check the method section")
    return OPTIMIZERS[cfg.name](groups, **kwargs)
