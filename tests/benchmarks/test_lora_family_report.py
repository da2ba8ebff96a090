"""benchmarks/lora_family: selection reads seed-0 validation only, a grid widens where its edge wins; claims are
judged on paired seeds."""
from __future__ import annotations

from benchmarks import lora_family, lora_family_report as report


def _row(method, lr, seed, valid, test, params=1000, file_bytes=4000, step_s=0.1, loss0=1.0, **fields):
    point = {"lr": lr, **fields}
    return {"method": method, "lr": lr, "point": point, "setting": report.label(point), "seed": seed,
            "valid_accuracy": valid, "test_accuracy": test,
            "trainable_params": params + 10, "adapter_params": params, "file_bytes": file_bytes, "steps": 40,
            "step_seconds": step_s, "valid_curve": [[10, valid - 0.1], [20, valid]],
            "loss_curve": [[5, loss0], [10, loss0 - 0.1], [40, 0.2]]}


def test_choose_lr_uses_seed0_validation_and_prefers_the_smaller_lr_on_ties():
    rows = [_row("a", 1e-3, 0, 0.5, 0.9), _row("a", 3e-3, 0, 0.7, 0.1), _row("a", 1e-2, 0, 0.7, 0.2),
            _row("a", 1e-2, 1, 0.99, 0.99),  # another seed never chooses
            {"method": "b", "lr": 1e-3, "seed": 0, "error": ["boom"]}, _row("b", 3e-3, 0, 0.4, 0.4)]
    assert lora_family.choose(rows) == {"a": {"lr": 3e-3}, "b": {"lr": 3e-3}}


def test_a_grid_widens_only_beyond_a_winning_edge_and_keeps_the_points_fields():
    rows = [_row("mid", 1e-3, 0, 0.5, 0), _row("mid", 3e-3, 0, 0.7, 0), _row("mid", 1e-2, 0, 0.6, 0),
            _row("low", 1e-3, 0, 0.7, 0), _row("low", 3e-3, 0, 0.6, 0),
            _row("high", 1e-3, 0, 0.5, 0, delora_lambda=1), _row("high", 3e-3, 0, 0.8, 0, delora_lambda=1),
            _row("high", 1e-2, 0, 0.7, 0),  # another lambda: its lrs do not make 3e-3 an inner point
            _row("top", 3e-1, 0, 0.9, 0), _row("top", 1e-1, 0, 0.1, 0)]  # the ladder ends at 0.3
    assert sorted(lora_family.edge_points(rows)) == [("high", {"lr": 1e-2, "delora_lambda": 1}),
                                                     ("low", {"lr": 3e-4})]
    assert report.label({"lr": 3e-3, "delora_lambda": 1}) == "0.003 delora_lambda=1"


def test_judge_bands_are_two_standard_errors():
    assert report.judge([0.02, 0.03, 0.025])["verdict"] == report.HOLDS
    assert report.judge([-0.02, -0.03, -0.025])["verdict"] == report.FAILS
    assert report.judge([0.05, -0.04, 0.01])["verdict"] == report.NOISE
    j = report.judge([1.0, 3.0])
    assert j["mean"] == 2.0 and j["band"] == [0.0, 4.0]


def test_summarise_claims_from_the_runs():
    rows = []
    for s in range(3):
        rows += [_row("lora", 1e-3, s, 0.75, 0.80 + 0.01 * s, params=300_000, file_bytes=1_200_000, step_s=0.10),
                 _row("vera", 1e-2, s, 0.72, 0.78 + 0.01 * s, params=20_000, file_bytes=90_000, step_s=0.12),
                 _row("pissa", 1e-3, s, 0.81, 0.8, loss0=0.6 + 0.01 * s),
                 _row("nola", 1e-2, s, 0.7, 0.7, file_bytes=12_000)]
    chosen = {"lora": {"lr": 1e-3}, "vera": {"lr": 1e-2}, "pissa": {"lr": 1e-3}, "nola": {"lr": 1e-2}}
    res = report.summarise(rows, chosen, {m: lora_family.METHODS[m] for m in chosen})
    vera = res["methods"]["vera"]
    assert abs(vera["step_time_vs_lora"] - 1.2) < 1e-9 and vera["reached_lora_valid"] == "0/3"
    assert res["methods"]["lora"]["reached_lora_valid"] == "3/3"
    c = res["claims"]
    assert c["vera_95pct_with_10x_fewer"]["verdict"] == report.HOLDS and c["vera_95pct_with_10x_fewer"]["fewer_params_x"] == 15
    assert c["pissa_converges_faster"]["verdict"] == report.HOLDS and c["pissa_converges_faster"]["mean"] > 0.3
    assert c["nola_file_vs_lora"]["ratio"] == 0.01
    assert "| vera | 0.01 |" in report.markdown({**res, "config": "x", "seeds": 3, "workers": 2, "seconds": 1.0})
