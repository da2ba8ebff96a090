"""benchmarks/time_to_accuracy.py end to end at 3 steps on 10 fortunes per topic, and its crossing rule."""
from __future__ import annotations

import pytest

from benchmarks import time_to_accuracy as tta
from benchmarks.stats import VERDICTS

from ._helpers import check_png, load_json


def _run(points):
    return {"curve": [{"step": s, "train_seconds": t, "test_accuracy": a} for s, t, a in points],
            "train_seconds": points[-1][1], "final_test_accuracy": points[-1][2]}


def test_crossing_is_the_first_measurement_at_peft_final_accuracy():
    peft = _run([(0, 0.0, 0.1), (10, 5.0, 0.5), (20, 10.0, 0.6)])
    ours = _run([(0, 0.0, 0.1), (10, 3.0, 0.55), (20, 6.0, 0.62), (30, 9.0, 0.58)])
    c = tta.crossing(ours, peft)
    assert c == {"goal_accuracy": 0.6, "seconds": 6.0, "step": 20, "ratio": 0.6, "band": [0.3, 0.6]}
    never = tta.crossing(_run([(0, 0.0, 0.1), (10, 3.0, 0.5)]), peft)
    assert never["ratio"] is None
    s = tta.summarize([{"unipeft": ours, "peft": peft}], every=10)
    assert s["ratio"] == 0.6 and s["band"] == [0.3, 0.6] and s["verdict"] == "within noise"  # band straddles 0.5
    assert tta.summarize([{"unipeft": _run([(0, 0.0, 0.1), (10, 3.0, 0.5)]), "peft": peft}], 10)["verdict"] == "missed"


def test_lr_lambda_is_unipefts_linear_schedule():
    from unipeft.train.optim import lr_factor

    f = tta.lr_lambda(3, 20)
    assert [f(s) for s in range(22)] == [lr_factor("linear", s, 3, 20) for s in range(22)]


@pytest.mark.slow
def test_time_to_accuracy_writes_both_curves_json_md_png(tmp_path):
    out = tmp_path / "tta.json"
    assert tta.main(["--max-steps", "3", "--max-per-category", "10", "--every", "2", "--threads", "1",
                     "--out", str(out)]) == out
    res = load_json(out)
    r = res["repeats"][0]
    assert r["order"] == ["unipeft", "peft"] and res["same_trainable_params"] and res["same_steps"]
    for lib in ("unipeft", "peft"):
        steps = [p["step"] for p in r[lib]["curve"]]
        assert steps == [0, 2, 3] and r[lib]["steps"] == 3  # before training, every 2 steps, and the last
        times = [p["train_seconds"] for p in r[lib]["curve"]]
        assert times[0] < 0.05 and times == sorted(times)  # evaluation time is not on the clock
        assert all(0 <= p["test_accuracy"] <= 1 for p in r[lib]["curve"])
    t = res["time_to_accuracy"]
    assert t["verdict"] in VERDICTS and t["per_repeat"][0]["goal_accuracy"] == r["peft"]["final_test_accuracy"]
    assert "paused" in res["clock"] and res["budget_overrides"] == ["--max_steps", "3", "--data.max_per_category", "10"]
    assert "Time to accuracy" in out.with_suffix(".md").read_text()
    check_png(out.with_suffix(".png"))
