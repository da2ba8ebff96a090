"""Shared kg fixtures: the bundled UMLS graph and one small ComplEx predictor trained once per session."""
from __future__ import annotations

import pytest

from unipeft.kg.datasets import load_dataset
from unipeft.kg.link import LinkConfig, train_link_predictor

# Small enough to train in a few seconds on one core, good enough to rank (filtered test MRR ~0.86, chance ~0.06).
SMALL_LINK = LinkConfig(rank=16, epochs=12, batch_size=256, lr=0.1, reg=5e-3, seed=0)


@pytest.fixture(scope="session")
def umls():
    """UMLS from the pykeen wheel."""
    return load_dataset("umls")


@pytest.fixture(scope="session")
def small_predictor(umls):
    """A ComplEx-N3 predictor trained briefly on UMLS (callers must not modify it)."""
    return train_link_predictor(umls, SMALL_LINK)
