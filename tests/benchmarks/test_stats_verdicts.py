"""The noise band of a ratio and the verdict of a target judged on it (benchmarks/stats.py, targets.py)."""
from __future__ import annotations

import pytest

from benchmarks import targets
from benchmarks.stats import MET, MISSED, NOISE, bootstrap_band, compare, ratio_of_medians, verdict


def test_verdict_is_met_only_when_the_whole_band_is_on_the_right_side():
    assert verdict([1.02, 1.08], 1.10) == MET
    assert verdict([1.05, 1.10], 1.10) == MET  # at the target counts as met
    assert verdict([1.05, 1.15], 1.10) == NOISE
    assert verdict([1.11, 1.20], 1.10) == MISSED
    assert verdict([1.20, 1.11], 1.10) == MISSED  # band ends in either order
    assert verdict([2.1, 2.5], 2.0, ">=") == MET and verdict([1.9, 2.1], 2.0, ">=") == NOISE
    assert verdict([1.5, 1.9], 2.0, ">=") == MISSED
    with pytest.raises(ValueError, match="direction"):
        verdict([1, 2], 1.5, "<")


def test_bootstrap_band_brackets_the_ratio_and_narrows_with_less_noise():
    a = [1.10, 1.12, 1.08, 1.11, 1.09, 1.30, 1.10]
    b = [1.00, 1.01, 0.99, 1.00, 1.02, 1.00, 0.98]
    lo, hi = bootstrap_band(a, b)
    r = ratio_of_medians(a, b)
    assert lo <= r <= hi and hi - lo < 0.1
    assert bootstrap_band(a, b) == (lo, hi)  # seeded: the same band every time
    assert bootstrap_band([2.0] * 5, [1.0] * 5) == (2.0, 2.0)
    assert bootstrap_band([3.0], [2.0]) == (1.5, 1.5)  # one repeat: no spread to resample
    noisy = [x * f for x, f in zip(a, (1.0, 1.4, 0.7, 1.3, 0.8, 1.2, 0.9))]
    nlo, nhi = bootstrap_band(noisy, b)
    assert nhi - nlo > hi - lo
    with pytest.raises(ValueError, match="paired"):
        bootstrap_band([1.0, 2.0], [1.0])
    c = compare(a, b)
    assert c["ratio"] == r and c["band"] == [lo, hi] and c["repeats"] == 7
    assert c["per_round_min_max"] == [min(x / y for x, y in zip(a, b)), max(x / y for x, y in zip(a, b))]


def _fig(ratio, lo, hi):
    return {"ratio": ratio, "band": [lo, hi]}


def test_targets_read_the_rows_and_judge_each_band():
    rows = [{"row": "train_step", "model": "m", "method": "lora_all_linear",
             "unipeft_over_bound": _fig(1.05, 1.02, 1.08), "unipeft_over_peft": _fig(0.86, 0.80, 0.90)},
            {"row": "train_step", "model": "m", "method": "lora_qv", "unipeft_over_bound": _fig(1.2, 1.15, 1.25)},
            {"row": "train_step", "model": "m", "method": "ia3", "errors": {"unipeft/ia3": "boom"}},
            {"row": "inference_overhead", "model": "m", "batch": 1, "unipeft_over_base": _fig(1.03, 1.01, 1.04)},
            {"row": "train_step", "model": "other", "method": "dora", "unipeft_over_unipeft_lora_qv": _fig(1, 1, 1)}]
    tta = {"time_to_accuracy": {"ratio": 0.4, "band": [0.35, 0.45]}, "source": "time_to_accuracy.json"}
    entries, missing = targets.judge(rows, "m", tta)
    got = {e["id"]: e["verdict"] for e in entries}
    assert got == {"lora_all_linear_vs_bound": MET, "lora_all_linear_vs_peft": NOISE, "lora_qv_vs_bound": MISSED,
                   "ia3_vs_peft": MISSED, "inference_overhead_batch1": MET, "time_to_accuracy_vs_peft": MET}
    ia3 = next(e for e in entries if e["id"] == "ia3_vs_peft")
    assert ia3["ratio"] is None and "boom" in ia3["error"]  # a failed measurement is a missed target, with why
    assert set(missing) == {"dora_vs_lora_qv", "prompt_tuning_vs_peft", "prefix_tuning_vs_peft",
                            "inference_overhead_batch16", "mixed_batch_vs_base"}  # 'other' model's row: not judged
    assert "time_to_accuracy_vs_peft" in targets.judge(rows, "m", None)[1]
