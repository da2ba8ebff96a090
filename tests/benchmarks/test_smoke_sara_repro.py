"""benchmarks/sara_repro.py end to end: three methods, 1 seed, 2 steps, 1-step memory probes, tiny data."""
from __future__ import annotations

import pytest

from benchmarks import sara_repro

from ._helpers import check_png, load_json


@pytest.mark.slow
def test_sara_repro_writes_json_and_png(tmp_path):
    out = tmp_path / "sara.json"
    assert sara_repro.main(["--seeds", "0", "--max-steps", "2", "--probe-steps", "1", "--max-per-category", "10",
                            "--held-out-texts", "16", "--out", str(out)]) == out
    results = load_json(out)
    assert results["seeds"] == [0] and results["max_steps"] == 2 and results["held_out_texts"] == 16
    assert list(results["methods"]) == ["lora", "sara", "full"]
    for name, m in results["methods"].items():
        assert len(m["runs"]) == 1 and m["runs"][0]["steps"] == 2 and 0 <= m["accuracy_mean"] <= 1
        assert m["cosine_drift_mean"] > 0  # training moved the encoder (the head alone would not)
        for key in sara_repro.MEMORY_SETTINGS:
            assert m[key]["steps"] == 1 and m[key]["peak_mb"] > 0, (name, key)
    assert results["methods"]["lora"]["memory_batch4"]["batch_size"] == sara_repro.SMALL_BATCH
    assert set(results["claims"]) == set(sara_repro.MEMORY_SETTINGS) | {"sara_drift_lt_lora"}
    check_png(out.with_suffix(".png"))
