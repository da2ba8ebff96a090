"""benchmarks/qlora.py end to end on a tiny budget (1 step, 1 timing round, 4 evaluation examples):
every configuration's child runs, the PEQA lr is chosen on validation, and JSON, table and PNG appear."""
from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")

from benchmarks import qlora  # noqa: E402
from benchmarks.stats import VERDICTS  # noqa: E402

from ._helpers import check_png, load_json  # noqa: E402


def test_peqa_lr_is_chosen_on_validation_only():
    runs = [{"lr": 3e-4, "valid": {"loss": 2.0}, "test": {"loss": 1.0}},
            {"lr": 3e-3, "valid": {"loss": 1.5}, "test": {"loss": 9.0}}]
    assert qlora.choose(runs)["lr"] == 3e-3


@pytest.mark.slow
def test_qlora_benchmark_writes_json_table_and_png(tmp_path):
    out = tmp_path / "qlora.json"
    qlora.main(["--steps", "1", "--ckpt-steps", "1", "--rounds", "1", "--eval-examples", "4", "--out", str(out)])
    res = load_json(out)
    assert [qlora.key(r) for r in res["runs"]] == [f"{lib} {q} {m}" for lib, q, m in qlora.RUNS] + [
        "unipeft nf4 peqa"]
    assert [s["lr"] for s in res["peqa_search"]] == list(qlora.PEQA_LRS)
    by = {qlora.key(r): r for r in res["runs"]}
    for r in res["runs"]:
        assert r["steps"] == 1 and r["test"]["tokens"] > 0 and r["train_total_mb"] > 0
    nf4, fp32 = by["unipeft nf4 lora"]["torch"], by["unipeft fp32 lora"]["torch"]
    assert nf4["weights_mb"] < 0.4 * fp32["weights_mb"]  # packed 4-bit linears, fp32 embedding
    assert by["unipeft nf4 peqa"]["trainable_params"] < by["unipeft nf4 lora"]["trainable_params"] / 10
    assert set(res["timing"]) == {"fp32", "nf4", "int8"}
    assert all(t["verdict"] in VERDICTS for t in res["targets"])
    table = out.with_suffix(".md").read_text()
    assert "| unipeft nf4 peqa (lr" in table and "## Targets" in table
    check_png(out.with_suffix(".png"))
