"""Ratios of interleaved timings with a noise band, and the verdict of a target judged on that band.

A ratio is median(a) / median(b) over the repeats of one interleaved measurement (round i times
a and b one after the other, so drift hits both alike). Its band is the 90% interval of a paired
bootstrap: resample the rounds (a_i, b_i pairs) with replacement and take the ratio of medians
of each resample. A target `ratio <= x` is "met" only if the whole band is at or below x,
"missed" if the whole band is above it, else "within noise".
"""
from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

MET, NOISE, MISSED = "met", "within noise", "missed"
VERDICTS = (MET, NOISE, MISSED)
BOOTSTRAP = 2000  # resamples; the band's ends move by well under 1% between seeds at this count
LEVEL = 0.90


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    """median(a) / median(b)."""
    return statistics.median(a) / statistics.median(b)


def bootstrap_band(a: Sequence[float], b: Sequence[float], level: float = LEVEL, resamples: int = BOOTSTRAP,
                   seed: int = 0) -> tuple[float, float]:
    """The `level` interval of median(a)/median(b) under a paired bootstrap of the rounds (a_i, b_i)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples needed: got {len(a)} and {len(b)} repeats")
    n = len(a)
    if n == 1:
        r = a[0] / b[0]
        return r, r
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(a[i] for i in idx) / statistics.median(b[i] for i in idx))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int(round((1 - tail) * (resamples - 1)))]


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """Ratio of medians, its bootstrap band and the spread of the per-round ratios a_i / b_i."""
    lo, hi = bootstrap_band(a, b)
    per_round = [x / y for x, y in zip(a, b)]
    return {"ratio": ratio_of_medians(a, b), "band": [lo, hi], "per_round_min_max": [min(per_round), max(per_round)],
            "repeats": len(a)}


def verdict(band: Sequence[float], target: float, direction: str = "<=") -> str:
    """'met' if the whole band is on the target's side, 'missed' if wholly on the wrong side, else 'within noise'."""
    lo, hi = min(band), max(band)
    if direction == "<=":
        return MET if hi <= target else MISSED if lo > target else NOISE
    if direction == ">=":
        return MET if lo >= target else MISSED if hi < target else NOISE
    raise ValueError(f"direction: expected '<=' or '>=', got {direction!r}")
