"""Server-side aggregation of client adapters (every function is pure: state dicts in, state dict out).

- `fedavg`: the example-weighted mean of every tensor (McMahan et al. 2017). On LoRA this is the naive
  FedAvg-LoRA: A and B averaged separately, so the global product mean(B) mean(A) is not the mean of the
  clients' products B_i A_i (the cross terms are the aggregation error).
- `fedavg_exact`: the mean product dW = sum_i w_i B_i A_i is formed and re-factored at the adapter's rank by
  SVD (B = U_r S_r^1/2, A = S_r^1/2 V_r^T); exact whenever dW has rank <= r, and the relative residual of the
  truncation is reported otherwise.
- FFA-LoRA (Sun et al. 2024) needs no function of its own: A is frozen at the same seeded init on every
  client, only B travels, and the mean of B_i A = (mean B_i) A is exact; it is `fedavg` on B.
- `lora_fair` (Bian et al. 2024): keep the averaged A (the next round starts from it) and correct the averaged
  B by the ridge solution of min ||dW - (B + dB) A||^2 + lam ||dB||^2, i.e.
  dB = (dW - B A) A^T (A A^T + lam I)^-1, with lam scaled by mean(diag(A A^T)) so it does not depend on A's size.
Other tensors of the adapter (a classifier head, biases) are averaged by `fedavg` in every strategy.
"""
from __future__ import annotations

import torch

A_SUFFIX, B_SUFFIX = "lora_A.weight", "lora_B.weight"


def normalised(weights: list[float]) -> list[float]:
    """Weights that sum to 1 (examples per client)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation needs at least one client with examples")
    return [float(w) / total for w in weights]


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of every tensor (float64 accumulation, stored in each tensor's dtype)."""
    w = normalised(weights)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for wi, s in zip(w, states):
            acc.add_(s[key].to(torch.float64), alpha=wi)
        out[key] = acc.to(first.dtype)
    return out


def lora_pairs(keys) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA site of a state dict (PEFT's lora_A.weight / lora_B.weight names)."""
    keys = set(keys)
    return [(k, k[: -len(A_SUFFIX)] + B_SUFFIX) for k in sorted(keys)
            if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in keys]


def mean_products(states: list[dict[str, torch.Tensor]], w: list[float], a: str, b: str) -> torch.Tensor:
    """sum_i w_i B_i A_i in float64: the update the clients' adapters add, on average."""
    return sum(wi * (s[b].to(torch.float64) @ s[a].to(torch.float64)) for wi, s in zip(w, states))


def fedavg_exact(states: list[dict[str, torch.Tensor]], weights: list[float]) -> tuple[dict, dict[str, float]]:
    """FedAvg of the products B_i A_i, re-factored by SVD at each site's rank; (state, {max_residual})."""
    w = normalised(weights)
    out = fedavg(states, weights)
    worst = 0.0
    for a, b in lora_pairs(out):
        dw = mean_products(states, w, a, b)
        r = out[a].shape[0]
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        root = s[:r].sqrt()
        out[b] = (u[:, :r] * root).to(out[b].dtype)
        out[a] = (root[:, None] * vh[:r]).to(out[a].dtype)
        norm = float(s.norm())
        if norm > 0:
            worst = max(worst, float(s[r:].norm()) / norm)
    return out, {"refactor_residual": worst}


def lora_fair(states: list[dict[str, torch.Tensor]], weights: list[float], lam: float = 1e-2) -> tuple[dict, dict]:
    """Averaged A, averaged B plus the ridge correction toward the mean product; (state, {max_residual})."""
    w = normalised(weights)
    out = fedavg(states, weights)
    worst = 0.0
    for a, b in lora_pairs(out):
        dw = mean_products(states, w, a, b)
        A, B = out[a].to(torch.float64), out[b].to(torch.float64)
        gram = A @ A.T
        ridge = lam * float(gram.diagonal().mean()) + 1e-12
        gap = dw - B @ A
        delta = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), (gap @ A.T).T).T
        out[b] = (B + delta).to(out[b].dtype)
        norm = float(dw.norm())
        if norm > 0:
            worst = max(worst, float((dw - (B + delta) @ A).norm()) / norm)
    return out, {"fair_residual": worst}


def naive_gap(states: list[dict[str, torch.Tensor]], weights: list[float], merged: dict) -> float:
    """max over sites of ||mean_i B_i A_i - B A|| / ||mean_i B_i A_i|| for an aggregated state (0: exact)."""
    w = normalised(weights)
    worst = 0.0
    for a, b in lora_pairs(merged):
        dw = mean_products(states, w, a, b)
        norm = float(dw.norm())
        if norm > 0:
            got = merged[b].to(torch.float64) @ merged[a].to(torch.float64)
            worst = max(worst, float((dw - got).norm()) / norm)
    return worst
