"""benchmarks/lora_family.py end to end on a tiny budget: selection, claims, JSON + markdown + PNG, and the
run cache (a second call trains nothing)."""
from __future__ import annotations

import pytest

from benchmarks import lora_family

from ._helpers import check_png, load_json

ARGS = ["--methods", "lora,pissa,vera,nola,adalora", "--seeds", "2", "--max-steps", "2",
        "--max-per-category", "10", "--eval-every", "1", "--extend-edges", "0"]


@pytest.mark.slow
def test_lora_family_writes_results_and_reuses_finished_runs(tmp_path):
    out, cache = tmp_path / "family.json", tmp_path / "runs.jsonl"
    assert lora_family.main(ARGS + ["--out", str(out), "--cache", str(cache)]) == out
    res = load_json(out)
    assert set(res["methods"]) == {"lora", "pissa", "vera", "nola", "adalora"} and not res["failed"]
    grid = {m: lora_family.METHODS[m][1] for m in res["methods"]}
    for m, row in res["methods"].items():
        assert row["lr"] in grid[m] and set(row["grid"]) == {f"{lr:g}" for lr in grid[m]}
        assert row["seeds"] == [0, 1] and 0 <= row["test_accuracy"] <= 1
    runs = res["runs"]
    assert len(runs) == sum(len(g) for g in grid.values()) + len(grid)  # the grid at seed 0, one more seed each
    assert all(r["steps"] == 2 and r["step_seconds"] > 0 and r["loss_curve"] for r in runs)
    assert res["methods"]["vera"]["adapter_params"] < res["methods"]["lora"]["adapter_params"]
    assert res["methods"]["nola"]["file_bytes"] < res["methods"]["lora"]["file_bytes"]
    assert {"pissa_converges_faster", "vera_95pct_with_10x_fewer", "adalora_at_least_lora",
            "nola_file_vs_lora"} <= set(res["claims"])
    assert res["task"] == "fortunes" and res["metric"] == "accuracy" and "--max_steps" in res["budget"]
    check_png(out.with_suffix(".png"))
    assert "| claim | measured | verdict |" in out.with_suffix(".md").read_text()
    cached = len(cache.read_text().splitlines())
    assert cached == len(runs)
    again = tmp_path / "again.json"
    lora_family.main(ARGS + ["--out", str(again), "--cache", str(cache)])
    assert len(cache.read_text().splitlines()) == cached  # every run came from the cache
    assert load_json(again)["runs"] == runs
