"""benchmarks/peft_types_cost.py on a tiny budget: both libraries timed per type against LoRA, the verdicts
read from the bands, JSON + markdown + PNG, and the types that cannot run on an encoder listed with a reason."""
from __future__ import annotations

import pytest

from benchmarks import peft_types_cost, peft_types_cost_report as report

from ._helpers import check_png, load_json

METHODS = ("lora", "ia3", "prompt_tuning")


def test_verdict_comes_from_the_whole_band():
    assert report.time_verdict({"ratio": 0.9, "band": [0.85, 0.95]}) == report.FASTER
    assert report.time_verdict({"ratio": 1.2, "band": [1.05, 1.3]}) == report.SLOWER
    assert report.time_verdict({"ratio": 1.1, "band": [0.99, 1.3]}) == report.NOISE
    assert report.time_verdict(None) is None


def test_every_registered_peft_type_has_a_spec_or_a_reason():
    types = peft_types_cost.peft_types()
    assert "lora" in types and types["lora"] == "LORA"
    assert set(types) <= set(peft_types_cost.SPECS) | set(peft_types_cost.NOT_APPLICABLE)


@pytest.mark.slow
def test_quick_run_writes_ratios_for_both_libraries_and_lists_not_applicable_types(tmp_path):
    out = tmp_path / "cost.json"
    assert peft_types_cost.main(["--quick", "--methods", ",".join(METHODS), "--out", str(out)]) == out
    res = load_json(out)
    rows = {r["method"]: r for r in res["rows"]}
    assert res["quick"] and res["lora_params"] > 0
    for name in METHODS:
        r = rows[name]
        assert r["status"] == "measured" and not r["errors"], (name, r["errors"])
        assert all(r["seconds"][f"{lib}/{name}"] > 0 for lib in ("unipeft", "peft"))
        assert all(r["params"][lib] > 0 for lib in ("unipeft", "peft"))
        fig = r["unipeft_over_peft"]
        assert fig["ratio"] > 0 and min(fig["band"]) <= fig["ratio"] <= max(fig["band"])
        assert r["verdict"] == report.time_verdict(fig)
        assert r["unipeft_over_lora"]["ratio"] > 0 and r["peft_over_lora"]["ratio"] > 0
    assert all(rows["lora"]["peak_mb"][lib] > 0 for lib in ("unipeft", "peft"))
    na = rows["adaption_prompt"]  # not asked for, still listed
    assert na["status"] == "not applicable" and na["reason"] and set(na["errors"]) == {"unipeft", "peft"}
    assert sum(res["verdict_counts"].values()) == len(METHODS)
    md = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in md for name in METHODS)
    assert "## Not applicable to an encoder (MiniLM)" in md and na["reason"] in md
    check_png(out.with_suffix(".png"))
