"""Keeps the benchmark code path alive on a micro model (timings belong to the benchmark output)."""
from __future__ import annotations

import json

from benchmarks.run import run


def test_benchmark_suite_runs_and_writes_json_and_table(tmp_path):
    path = run("test", tmp_path)
    payload = json.loads(path.read_text())
    kinds = {r["row"] for r in payload["rows"]}
    assert kinds == {"train_step", "inference_overhead", "mixed_batch", "inject_load", "merge"}
    assert {r["method"] for r in payload["rows"] if r["row"] == "train_step"} == {
        "lora_qv", "lora_all_linear", "dora", "ia3"}
    merge = next(r for r in payload["rows"] if r["row"] == "merge")
    assert merge["max_abs_deviation"]["unipeft"] < 1e-5  # a correctness figure, not a timing
    assert payload["versions"]["peft"] and (tmp_path / "peft_test.md").read_text().startswith("# unipeft vs peft")


def test_memory_probe_reports_a_positive_peak():
    from benchmarks.common import peak_rss_mb

    out = peak_rss_mb("benchmarks.memprobe", ["--lib", "unipeft", "--model", "micro-gpt2", "--method", "lora_qv",
                                              "--batch", "2", "--seq", "8", "--steps", "2"])
    assert out["steps"] == 2 and out["peak_mb"] >= 0
