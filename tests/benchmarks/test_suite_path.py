"""Keeps the benchmark code path alive on a micro model (timings belong to the benchmark output)."""
from __future__ import annotations

import re

from benchmarks.run import run
from benchmarks.stats import VERDICTS, verdict
from benchmarks.targets import SPECS

from ._helpers import check_png, load_json

KINDS = {"train_step", "inference_overhead", "mixed_batch", "inject_load", "merge", "compile"}
METHODS = {"lora_qv", "lora_all_linear", "dora", "ia3", "prompt_tuning", "prefix_tuning"}


def test_benchmark_suite_writes_rows_bands_profiles_findings_targets_and_png(tmp_path):
    path = run("test", tmp_path, threads=1)
    payload = load_json(path)
    rows = payload["rows"]
    assert {r["row"] for r in rows} == KINDS
    train = [r for r in rows if r["row"] == "train_step"]
    assert {r["method"] for r in train} == METHODS
    for r in train:  # every library ran every method; every ratio has its band from the per-round samples
        assert not r["errors"], r["errors"]
        for key in ("unipeft_over_bound", "peft_over_bound", "unipeft_over_peft"):
            lo, hi = r[key]["band"]
            assert lo <= hi and r[key]["repeats"] == 3 == len(r["samples"]["unipeft"])
    assert "unipeft_over_unipeft_lora_qv" in next(r for r in train if r["method"] == "dora")
    mixed = next(r for r in rows if r["row"] == "mixed_batch")
    assert mixed["distinct_adapters_in_batch"] == mixed["adapters"] == 8  # each row its own adapter
    inject = next(r for r in rows if r["row"] == "inject_load")
    assert inject["label"] == "median of adapters 4-6 / median of adapters 2-4"
    merge = next(r for r in rows if r["row"] == "merge")
    assert merge["max_abs_deviation"]["unipeft"] < 1e-5  # a correctness figure, not a timing
    for r in (r for r in rows if r["row"] == "compile"):
        assert "eager_over_compiled" in r or r["error"]  # a ratio, or the error text
    # profiles of every training configuration and of the batch-1 forward, per step
    prof = payload["profiles"]["micro-gpt2"]
    assert set(prof["train_step"]) == {"bound"} | {f"{lib}/{m}" for lib in ("unipeft", "peft") for m in METHODS}
    assert set(prof["inference_batch1"]) == {"base", "unipeft", "peft"}
    bound = prof["train_step"]["bound"]
    assert bound["ops"] and {"op", "self_ms", "pct_of_step", "calls"} == set(bound["ops"][0])
    # findings quote the profile's own numbers (the bound's profiled step time appears in its sentence)
    assert payload["findings"] and f"{bound['wall_ms_per_step']:.2f} ms" in payload["findings"][0]
    # one target per spec the test suite measures (no batch 16, no time-to-accuracy file), each verdict recomputable
    measured = {e["id"] for e in payload["targets"]}
    assert measured == {s[0] for s in SPECS} - {"inference_overhead_batch16"}
    assert set(payload["targets_not_measured"]) == {"inference_overhead_batch16", "time_to_accuracy_vs_peft"}
    for e in payload["targets"]:
        assert e["verdict"] in VERDICTS and e["verdict"] == verdict(e["band"], e["threshold"])
    md = (tmp_path / "peft_test.md").read_text()
    assert md.startswith("# unipeft vs peft") and "## Targets" in md and "## Findings" in md
    assert re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", md)  # ratios with bands
    check_png(path.with_suffix(".png"))


def test_a_compile_that_fails_is_recorded_not_raised(monkeypatch):
    import torch

    from benchmarks.compile_rows import compile_rows

    def broken(*_, **__):
        raise RuntimeError("backend exploded")
    monkeypatch.setattr(torch, "compile", broken)
    rows = compile_rows("micro-gpt2", 2, 8, repeat=1, backend="eager")
    assert [r["kind"] for r in rows] == ["train_step", "inference"]
    assert all(r["error"] == "RuntimeError: backend exploded" and "eager_over_compiled" not in r for r in rows)


def test_threads_default_to_the_physical_cores_whatever_the_load():
    from benchmarks.run import choose_threads
    from unipeft.train.threads import allowed_cpus, physical_cores

    th = choose_threads(None)
    assert th["threads"] == physical_cores(allowed_cpus()) and "load_1min" in th and "busy_warning" in th
    assert choose_threads(3)["threads"] == 3


def test_memory_probe_reports_a_positive_peak():
    from benchmarks.common import peak_rss_mb

    out = peak_rss_mb("benchmarks.memprobe", ["--lib", "unipeft", "--model", "micro-gpt2", "--method", "lora_qv",
                                              "--batch", "2", "--seq", "8", "--steps", "2"])
    assert out["steps"] == 2 and out["peak_mb"] >= 0
