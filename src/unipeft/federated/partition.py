"""Client splits of a training set: IID, or non-IID by a Dirichlet over the labels (topics).

`dirichlet` follows the usual label-skew recipe (Hsu et al. 2019, used by FedAvg-LoRA and FFA-LoRA's
benchmarks): for every label, the share of its examples each client receives is drawn from
Dirichlet(alpha, ..., alpha); alpha 0.1 gives most clients one or two topics, alpha 100 is close to IID.
Both are seeded and deterministic; every example goes to exactly one client, and draws are repeated (same
generator) until every client has at least `min_size` examples.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import ConfigError

KINDS = ("iid", "dirichlet")


def iid_partition(n: int, clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of range(n) cut into `clients` nearly equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, clients)]


def dirichlet_partition(labels: Sequence[int], clients: int, alpha: float, seed: int,
                        min_size: int = 2, attempts: int = 1000) -> list[list[int]]:
    """Label-skewed parts: label k's examples are dealt to clients in Dirichlet(alpha) proportions."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for k in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            shares = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(f"partition.alpha: {alpha} leaves a client with fewer than {min_size} of {len(labels)} "
                      f"examples in {attempts} draws; use fewer clients or a larger alpha")


def partition(labels: Sequence[int], clients: int, kind: str, alpha: float, seed: int) -> list[list[int]]:
    """Indices of each client's examples (kind 'iid' or 'dirichlet')."""
    if clients < 1:
        raise ConfigError(f"clients: expected a positive integer, got {clients}")
    if clients > len(labels):
        raise ConfigError(f"clients: {clients} clients for {len(labels)} training examples")
    if kind == "iid":
        return iid_partition(len(labels), clients, seed)
    if kind == "dirichlet":
        if not alpha > 0:
            raise ConfigError(f"partition.alpha: expected a positive number, got {alpha}")
        return dirichlet_partition(labels, clients, alpha, seed)
    raise ConfigError(f"partition.kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def label_histogram(labels: Sequence[int], parts: list[list[int]], num_labels: int) -> list[list[int]]:
    """Per client, how many examples of each label it holds (shown by the CLI and the benchmark)."""
    labels = np.asarray(labels)
    return [np.bincount(labels[p], minlength=num_labels).tolist() for p in parts]
