"""benchmarks/serving.py end to end on the quick budget: a tiny seeded Llama, 4 LoRA adapters, 16 concurrent
requests against the real `unipeft serve` subprocess, the PEFT naive loop, JSON + markdown + PNG."""
from __future__ import annotations

import pytest

from benchmarks import serving, serving_report
from benchmarks.stats import VERDICTS, verdict

from ._helpers import check_png, load_json


@pytest.mark.slow
def test_quick_serving_benchmark_answers_every_request_correctly_and_reports(tmp_path):
    out = tmp_path / "serving.json"
    assert serving.main(["--quick", "--threads", "1", "--out", str(out)]) == out
    res = load_json(out)
    assert (res["model"], res["adapters"], res["requests"], res["max_tokens"], res["rounds"]) == ("tiny", 4, 16, 8, 2)
    assert set(res["systems"]) == {"server", "base", "naive"}
    for name, sysm in res["systems"].items():
        assert len(sysm["tokens_per_s"]) == 2 and all(x > 0 for x in sysm["tokens_per_s"]), name
        assert sysm["tokens"] == [16 * 8, 16 * 8], name  # every request generated exactly max_tokens tokens
        assert 0 < sysm["p50_s"] <= sysm["p99_s"] and len(sysm["latency_quantiles"]) == 21
    ch = res["checks"]
    assert ch["requests"] == 2 * 2 * 16 and ch["ok"] == ch["requests"]  # (adapters, base) x rounds x requests
    assert ch["lost"] == ch["failed"] == ch["ill-formed"] == 0
    assert ch["checked_per_round"] == 8 and ch["wrong"] == 0, ch["wrong_examples"]
    assert ch["inconsistent_across_rounds"] == 0
    assert [t["goal"] for t in res["targets"]] == [">= 5.0", ">= 0.8", "== 0", "== 0"]
    for t in res["targets"][:2]:
        lo, hi = t["band"]
        assert lo <= t["value"] <= hi and t["verdict"] == verdict(t["band"], float(t["goal"][3:]), ">=")
    assert all(t["verdict"] in VERDICTS for t in res["targets"])
    assert [t["verdict"] for t in res["targets"][2:]] == ["met", "met"]
    md = out.with_suffix(".md").read_text()
    assert md == serving_report.markdown(res)  # the report renders from the JSON alone
    assert "| system | tokens/s (median) |" in md and "## Findings" in md and "PEFT naive loop" in md
    check_png(out.with_suffix(".png"))
