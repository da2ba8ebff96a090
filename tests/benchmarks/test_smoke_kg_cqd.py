"""benchmarks/kg_cqd.py and kg_cqd_multi.py end to end with --quick (tiny budget) into a tmp folder."""
from __future__ import annotations

from benchmarks import kg_cqd, kg_cqd_multi

from ._helpers import check_png, load_json

LABELS = ["CQD", "CQD^A", "CQD^A (1% of training queries)", "CQD^A (trained on 1p, 2p, 2i, 2in only)"]


def test_kg_cqd_quick_writes_json_table_and_png(tmp_path):
    path = kg_cqd.main(["--quick", "--out-dir", str(tmp_path), "--out", "smoke"])
    assert path == tmp_path / "smoke.json"
    payload = load_json(path)
    assert set(payload) == {"dataset", "seed", "link_predictor", "queries", "budget", "cqd_selection",
                            "cqda_selection", "calibrators", "parameters", "methods", "eval_seconds", "claims",
                            "total_seconds", "versions"}
    assert payload["queries"]["n_test"] == 20 and payload["dataset"]["name"] == "umls"
    assert list(payload["methods"]) == LABELS
    for res in payload["methods"].values():
        assert len(res["per_structure"]) == 14 and all(0 <= s["mrr"] <= 1 for s in res["per_structure"].values())
    # CQD's setting is the argmax of the full grid's validation scores, computed on the validation queries.
    sel = payload["cqd_selection"]
    assert sel["grid"] == {"tnorm": ["prod", "min"], "normalize": ["sigmoid", "minmax"]}
    assert list(sel["valid"]) == ["prod/sigmoid", "prod/minmax", "min/sigmoid", "min/minmax"]
    assert sel["valid_queries"] == {s: v["queries"] for s, v in payload["queries"]["stats"]["valid"].items()}
    best = max(sel["valid"], key=lambda k: sel["valid"][k]["avg_mrr"])
    assert kg_cqd.setting_name(**sel["chosen"]) == best
    assert payload["cqda_selection"]["tnorm"] == "prod"
    assert len(payload["calibrators"]) == 3
    assert all(rep["history"] and rep["config"]["steps"] == 20 and rep["history"][0]["step"] == 0
               for rep in payload["calibrators"].values())
    assert len(payload["claims"]) == 5 and all(isinstance(v, bool) for v in payload["claims"].values())
    assert (tmp_path / "smoke.md").read_text().startswith("Test MRR (%)")
    check_png(tmp_path / "smoke.png")


def test_kg_cqd_multi_quick_aggregates_seeds_with_computed_verdicts(tmp_path):
    path = kg_cqd_multi.main(["--quick", "--datasets", "nations", "--seeds", "0,1", "--out-dir", str(tmp_path)])
    payload = load_json(path)
    assert payload["runs"] == {"nations": {"0": "kg_cqd_nations_seed0.json", "1": "kg_cqd_nations_seed1.json"}}
    d = payload["datasets"]["nations"]
    runs = [load_json(tmp_path / f"kg_cqd_nations_seed{s}.json") for s in (0, 1)]
    assert d["cqd_chosen"] == {str(s): kg_cqd.setting_name(**r["cqd_selection"]["chosen"]) for s, r in enumerate(runs)}
    assert list(d["methods"]) == LABELS
    avg = d["methods"]["CQD"]["avg"]
    assert avg["per_seed"] == [r["methods"]["CQD"]["avg_mrr"] for r in runs]
    assert abs(avg["mean"] - sum(avg["per_seed"]) / 2) < 1e-4
    assert len(d["claims"]) == 5
    for c in d["claims"].values():  # every verdict is what `verdict` makes of the stored numbers
        assert c["verdict"] == kg_cqd_multi.verdict(c["kind"], c["per_seed_difference"], c["band"])
    assert (tmp_path / "kg_cqd_multi.md").read_text().startswith("CQD (tuned")
    check_png(tmp_path / "kg_cqd_multi.png")


def test_verdict_rules_on_hand_examples():
    v = kg_cqd_multi.verdict
    assert v("beats", [0.05, 0.04, 0.06], 0.01) == "holds"
    assert v("beats", [0.10, -0.01, 0.06], 0.01) == "holds on the mean only"
    assert v("beats", [0.01, -0.01, 0.005], 0.02) == "within noise"
    assert v("beats", [-0.05, -0.04, -0.06], 0.01) == "does not hold"
    assert v("matches", [-0.005, 0.0, -0.01], 0.02) == "holds"
    assert v("matches", [-0.03, 0.02, 0.0], 0.02) == "holds on the mean only"
    assert v("matches", [-0.05, -0.04, -0.06], 0.02) == "does not hold"
