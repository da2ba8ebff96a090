"""Client splits: every example in exactly one part, seeded, and skew that grows as alpha falls."""
import numpy as np
import pytest

from unipeft.core.errors import ConfigError
from unipeft.federated.partition import label_histogram, partition

LABELS = [i % 8 for i in range(800)]


def _mean_top_share(parts) -> float:
    """Mean over clients of the share of a client's examples that carry its commonest label."""
    hist = np.array(label_histogram(LABELS, parts, 8), dtype=float)
    return float((hist.max(1) / hist.sum(1)).mean())


@pytest.mark.parametrize("kind,alpha", [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 1.0), ("dirichlet", 100.0)])
def test_parts_cover_every_example_once_and_are_seeded(kind, alpha):
    parts = partition(LABELS, 8, kind, alpha, seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(LABELS)))
    assert len(parts) == 8 and min(len(p) for p in parts) >= 2
    assert parts == partition(LABELS, 8, kind, alpha, seed=3)
    assert parts != partition(LABELS, 8, kind, alpha, seed=4)


def test_skew_falls_as_alpha_rises():
    skew = {a: np.mean([_mean_top_share(partition(LABELS, 8, "dirichlet", a, s)) for s in range(3)])
            for a in (0.1, 1.0, 100.0)}
    iid = _mean_top_share(partition(LABELS, 8, "iid", 1.0, 0))
    assert skew[0.1] > 0.6 > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.25 and iid < 0.25  # near the 1/8 of an even split
    assert abs(len(partition(LABELS, 8, "iid", 1.0, 0)[0]) - 100) <= 1


@pytest.mark.parametrize("args,field", [((8, "dirichlet", 0.0), "alpha"), ((8, "zipf", 1.0), "partition.kind"),
                                        ((0, "iid", 1.0), "clients"), ((900, "iid", 1.0), "clients")])
def test_bad_partition_is_refused_naming_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        partition(LABELS, *args, seed=0)
