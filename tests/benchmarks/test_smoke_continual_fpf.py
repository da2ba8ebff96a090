"""benchmarks/continual_fpf.py end to end on Seq-Digits at a tiny budget (1 seed, 1 epoch per task, few FPF steps)."""
from __future__ import annotations

from benchmarks import continual_fpf

from ._helpers import check_png, load_json


def test_continual_fpf_writes_json_and_png(tmp_path):
    out = tmp_path / "continual.json"
    assert continual_fpf.main(["--benchmark", "seq-digits", "--seeds", "0", "--epochs", "1", "--fpf-steps", "5",
                               "--kfpf-steps", "2", "--out", str(out)]) == out
    result = load_json(out)
    assert set(result) == {"versions", "seeds", "benchmarks"} and result["seeds"] == [0]
    bench = result["benchmarks"]["seq-digits"]
    from unipeft.continual import DEFAULT_METHODS

    assert bench["methods"][:len(DEFAULT_METHODS)] == list(DEFAULT_METHODS)
    assert len(bench["methods"]) == len(DEFAULT_METHODS) + 2  # the two Seq-Digits ablations
    config = bench["config"]
    assert config["epochs"] == 1 and config["fpf"]["steps"] == 5 and config["kfpf_steps"] == 2  # the budget reached it
    for method in bench["methods"]:
        rows = bench["per_seed"][method]
        assert len(rows) == 1 and 0 <= rows[0]["final_average_accuracy"] <= 1
        assert set(bench["summary"][method]) >= {"final_average_accuracy", "average_forgetting", "flops_vs_er"}
    assert set(bench["claims"]) == {"fpf_improves_er", "fpf_improves_derpp", "kfpf_vs_er+fpf", "kfpf_vs_derpp+fpf",
                                    "kfpf-kd_vs_er+fpf", "kfpf-kd_vs_derpp+fpf"}
    width, height = check_png(out.with_suffix(".png"))
    assert width > height  # one row of four panels
