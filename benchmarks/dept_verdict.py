"""Per-seed savings, their spread and the verdict on a DePT claim: the only place verdict strings are made."""
from __future__ import annotations

import math
import statistics

HOLDS, MEAN_ONLY, NOISE, FAILS = "holds", "holds on the mean only", "within noise", "does not hold"
# The noise band around the threshold is two standard errors of the per-seed mean:
# band = 2 * stdev(per-seed values) / sqrt(n seeds). With one seed the band is 0.
BAND_SE = 2.0


def paired(pt: list[dict], dp: list[dict], key: str, saving: bool) -> list[float]:
    """Per-seed figures, paired by seed: DePT's relative saving 1 - dept/pt, or the difference dept - pt."""
    by_seed = {r["seed"]: r[key] for r in pt}
    return [1 - r[key] / by_seed[r["seed"]] if saving else r[key] - by_seed[r["seed"]]
            for r in dp if r["seed"] in by_seed]


def band(values: list[float]) -> float:
    """Half-width of the noise band: BAND_SE standard errors of the mean of `values`."""
    return BAND_SE * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def verdict(values: list[float], threshold: float) -> str:
    """'holds' if every seed reaches `threshold`; else 'within noise' if the mean lies within band() of it;
    else 'holds on the mean only' (mean above the band) or 'does not hold' (mean below it)."""
    mean, half = statistics.mean(values), band(values)
    if min(values) >= threshold:
        return HOLDS
    if abs(mean - threshold) <= half:
        return NOISE
    return MEAN_ONLY if mean > threshold else FAILS


def judge(values: list[float], threshold: float) -> dict:
    """Per-seed values, mean, band and verdict against `threshold`, as stored in the JSON."""
    return {"per_seed": values, "mean": statistics.mean(values), "band": band(values),
            "threshold": threshold, "verdict": verdict(values, threshold)}
