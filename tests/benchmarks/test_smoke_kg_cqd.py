"""benchmarks/kg_cqd.py end to end with --quick (tiny query sets, 20 calibration steps) into a tmp folder."""
from __future__ import annotations

from benchmarks import kg_cqd

from ._helpers import check_png, load_json


def test_kg_cqd_quick_writes_json_table_and_png(tmp_path):
    path = kg_cqd.main(["--quick", "--out-dir", str(tmp_path), "--out", "smoke"])
    assert path == tmp_path / "smoke.json"
    payload = load_json(path)
    assert set(payload) == {"dataset", "seed", "link_predictor", "queries", "calibrators", "parameters", "methods",
                            "eval_seconds", "claims", "total_seconds", "versions"}
    assert payload["queries"]["n_test"] == 20 and payload["dataset"]["name"] == "umls"
    assert list(payload["methods"]) == ["CQD (product)", "CQD (Goedel)", "CQD^A", "CQD^A (1% of training queries)",
                                        "CQD^A (trained on 1p, 2p, 2i, 2in only)"]
    for res in payload["methods"].values():
        assert len(res["per_structure"]) == 14 and all(0 <= s["mrr"] <= 1 for s in res["per_structure"].values())
    assert len(payload["calibrators"]) == 3
    assert all(rep["history"] and rep["config"]["steps"] == 20 for rep in payload["calibrators"].values())
    assert len(payload["claims"]) == 7 and all(isinstance(v, bool) for v in payload["claims"].values())
    assert (tmp_path / "smoke.md").read_text().startswith("Test MRR (%)")
    check_png(tmp_path / "smoke.png")
