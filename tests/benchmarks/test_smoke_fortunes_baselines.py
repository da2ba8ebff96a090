"""benchmarks/fortunes_baselines.py end to end: all four baselines at 2 steps on 10 fortunes per topic."""
from __future__ import annotations

from benchmarks import fortunes_baselines

from ._helpers import check_png, load_json

BUDGET = ["--max-steps", "2", "--max-per-category", "10"]


def test_fortunes_baselines_write_json_and_png_and_keep_other_rows(tmp_path):
    out = tmp_path / "baselines.json"
    assert fortunes_baselines.main(BUDGET + ["--out", str(out)]) == out
    results = load_json(out)
    assert set(results["runs"]) == {"tfidf", "head", "lora", "full"}
    for name, row in results["runs"].items():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1 and row["max_per_category"] == 10
        if name != "tfidf":
            assert row["steps"] == 2 and row["trainable_params"] > 0
    assert sum(results["runs"]["tfidf"]["examples"].values()) == 80  # 8 topics x 10: the cap reached the data
    assert {"lora_over_full", "lora_reaches_95pct_of_full", "torch", "seed", "config"} <= set(results)
    png = out.with_suffix(".png")
    check_png(png)
    # --only one row: the rows already in the JSON are kept, the PNG is redrawn
    before = png.stat().st_mtime_ns
    fortunes_baselines.main(BUDGET + ["--out", str(out), "--only", "tfidf"])
    assert set(load_json(out)["runs"]) == {"tfidf", "head", "lora", "full"} and png.stat().st_mtime_ns > before
