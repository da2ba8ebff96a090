"""Guard for every benchmark test: benchmarks/results/ (measured figures) is never written by a test."""
from __future__ import annotations

from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _snapshot() -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(RESULTS.iterdir())}


@pytest.fixture(autouse=True)
def results_untouched():
    """Fail a test that adds, removes or rewrites anything in benchmarks/results/."""
    before = _snapshot()
    yield
    assert _snapshot() == before, "a benchmark test wrote into benchmarks/results/"
