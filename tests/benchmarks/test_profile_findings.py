"""Findings are sentences computed from the profile tables: constructed tables, their numbers in the text."""
from __future__ import annotations

from benchmarks.profile import findings, table_from_events
from benchmarks.table import profile_tables

STEPS = 2


def _table(wall_ms: float, ops: dict[str, tuple[float, int]]) -> dict:
    """A table from per-step (self ms, calls) per op (the events are totals over STEPS steps)."""
    return table_from_events([(k, ms * STEPS, calls * STEPS) for k, (ms, calls) in ops.items()], STEPS, wall_ms)


BOUND = _table(100.0, {"aten::addmm": (60.0, 36), "aten::bernoulli_": (8.0, 19), "aten::native_dropout": (1.0, 19),
                       "aten::mm": (10.0, 12)})
OURS = _table(112.0, {"aten::addmm": (61.0, 72), "aten::bernoulli_": (8.2, 19), "aten::native_dropout": (1.0, 19),
                      "aten::mm": (14.5, 60), "FusedLora": (3.0, 36)})
PEFT = _table(125.0, {"aten::addmm": (60.5, 36), "aten::bernoulli_": (8.1, 55), "aten::mm": (20.0, 84),
                      "aten::native_dropout": (1.0, 19)})
BASE = _table(20.0, {"aten::addmm": (15.0, 36), "aten::mm": (1.0, 4)})
LORA = _table(22.0, {"aten::addmm": (15.5, 48), "aten::mm": (1.8, 16)})


def test_table_is_per_step_sorted_and_sums_the_ops():
    assert [o["op"] for o in BOUND["ops"]] == ["aten::addmm", "aten::mm", "aten::bernoulli_", "aten::native_dropout"]
    first = BOUND["ops"][0]
    assert first == {"op": "aten::addmm", "self_ms": 60.0, "pct_of_step": 60.0, "calls": 36.0}
    assert BOUND["op_ms_per_step"] == 79.0 and BOUND["outside_ops_ms_per_step"] == 21.0


def test_findings_state_the_numbers_of_the_tables():
    profiles = {"train_step": {"bound": BOUND, "unipeft/lora_all_linear": OURS, "peft/lora_all_linear": PEFT},
                "inference_batch1": {"base": BASE, "unipeft": LORA, "peft": PEFT}}
    text = findings("minilm", profiles, timed_bound_s=0.080)
    joined = "\n".join(text)
    # dropout's share of the bound: 8.00 of 100.00 ms, and native_dropout's 1.00 ms; 9.00 ms together
    assert "aten::bernoulli_ 8.00 ms = 8.0%" in joined and "aten::native_dropout 1.00 ms = 1.0%" in joined
    assert "together 9.00 ms = 9.0% of the bound's step" in joined
    assert "from 80.00 ms (median of the timing rows) to 100.00 ms (1.25x)" in joined
    # unipeft over the bound: +12 ms; matmul calls 132 vs 48 (+84), self time 75.5 vs 70 ms (+5.50 ms = 5.5%)
    assert "112.00 ms vs the bound's 100.00 ms (+12.00 ms = 12.0% of the bound)" in joined
    assert "+84 matmul calls per step over the bound (132 vs 48" in joined
    assert "differs by +5.50 ms per step = 5.5% of the bound's step" in joined
    assert "aten::mm +4.50 ms (+48 calls)" in joined and "FusedLora +3.00 ms (+36 calls)" in joined
    # unipeft vs peft: 112 vs 125 ms (0.90x), the largest difference aten::mm -5.50 ms (-24 calls)
    assert "unipeft 112.00 ms vs peft 125.00 ms per profiled step (0.90x)" in joined
    assert "aten::mm -5.50 ms (-24 calls)" in joined
    # inference: 22 vs 20 ms (10.0% over); matmul calls 64 vs 40 (+24), +1.30 ms = 6.5% of the base forward
    assert "unipeft 22.00 ms per profiled forward vs the base's 20.00 ms (10.0% over)" in joined
    assert "adds +24 matmul calls (64 vs 40) whose self time is +1.30 ms = 6.5% of the base forward" in joined
    assert "peft 125.00 ms (525.0% over the base)" in joined


def test_findings_change_with_the_numbers_and_report_what_could_not_be_profiled():
    no_dropout = _table(50.0, {"aten::addmm": (40.0, 36)})
    profiles = {"train_step": {"bound": no_dropout, "unipeft/ia3": {"error": "RuntimeError: x"},
                               "peft/ia3": no_dropout}}
    text = findings("tiny", profiles)
    assert text[0].startswith("tiny: no dropout op") and "50.00 ms per step" in text[0]
    assert any("unipeft could not be profiled (RuntimeError: x)" in t for t in text)
    assert not any("inflates" in t for t in text)  # no timed bound given: no inflation sentence


def test_markdown_profile_tables_show_self_ms_share_and_calls():
    md = "\n".join(profile_tables({"minilm": {"train_step": {"bound": BOUND}}}))
    assert "### minilm train_step bound: 100.00 ms per profiled step (21.00 ms outside profiled ops)" in md
    assert "| aten::addmm | 60.000 | 60.0 | 36 |" in md and "| aten::bernoulli_ | 8.000 | 8.0 | 19 |" in md
