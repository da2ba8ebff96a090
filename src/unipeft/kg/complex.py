"""ComplEx (Trouillon et al. 2016) with N3 regularisation (Lacroix et al. 2018), as a frozen base model.

`LinkPredictor` is what `up.adapt` receives; its `scorer` (a `ComplEx`) is the site a calibrator
attaches to. Both map a LongTensor x of (head, relation) rows, shape (B, 2), to raw scores of
every entity as the tail, shape (B, N). Relations r + R are the reciprocals of r.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError


class ComplEx(nn.Module):
    """score(h, r, t) = Re(<e_h, w_r, conj(e_t)>); embeddings hold [real | imaginary] halves."""

    def __init__(self, n_entities: int, n_relations: int, rank: int, init_scale: float = 1e-3) -> None:
        super().__init__()
        if min(n_entities, n_relations, rank) <= 0:
            raise ConfigError(f"ComplEx: n_entities, n_relations and rank must be positive, got "
                              f"{n_entities}, {n_relations}, {rank}")
        self.rank = rank
        # Plain parameters, not nn.Embedding: the scorer is one site as a whole (its calibrator),
        # and methods that adapt embedding layers have nothing to wrap inside it.
        # Small init as in the reference ComplEx-N3 code.
        self.entity = nn.Parameter(torch.randn(n_entities, 2 * rank) * init_scale)
        self.relation = nn.Parameter(torch.randn(n_relations, 2 * rank) * init_scale)

    @property
    def n_entities(self) -> int:
        """Number of entities."""
        return self.entity.shape[0]

    @property
    def n_relations(self) -> int:
        """Number of relations, reciprocals included."""
        return self.relation.shape[0]

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"ComplEx expects (head, relation) index rows of shape (B, 2), got {tuple(x.shape)}")
        lhs, rel = self.entity[x[:, 0]], self.relation[x[:, 1]]
        k = self.rank
        lr, li, rr, ri = lhs[:, :k], lhs[:, k:], rel[:, :k], rel[:, k:]
        return torch.cat([lr * rr - li * ri, lr * ri + li * rr], 1), lhs, rel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw scores (B, N) of every entity as the tail of (x[:, 0], x[:, 1], ?)."""
        q, _, _ = self._query(x)
        return q @ self.entity.T

    def forward_with_factors(self, x: torch.Tensor, tails: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, N) and the N3 penalty sum_b (|e_h|^3 + |w_r|^3 + |e_t|^3), moduli of complex entries."""
        q, lhs, rel = self._query(x)
        rhs = self.entity[tails]
        k = self.rank

        def modulus(e: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(e[:, :k] ** 2 + e[:, k:] ** 2)

        n3 = sum((modulus(e) ** 3).sum() for e in (lhs, rel, rhs))
        return q @ self.entity.T, n3


class LinkPredictor(nn.Module):
    """The frozen link predictor handed to `up.adapt`; `scorer` is the adaptable site."""

    def __init__(self, n_entities: int, n_relations: int, rank: int) -> None:
        super().__init__()
        self.scorer = ComplEx(n_entities, n_relations, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (B, N) tail scores for (head, relation) rows x."""
        return self.scorer(x)

    def hparams(self) -> dict[str, int]:
        """Constructor arguments (saved next to the weights)."""
        s = getattr(self.scorer, "base_layer", self.scorer)  # the ComplEx, also once adapted
        return {"n_entities": s.n_entities, "n_relations": s.n_relations, "rank": s.rank}
