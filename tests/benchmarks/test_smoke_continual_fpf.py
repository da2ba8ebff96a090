"""benchmarks/continual_fpf.py end to end on Seq-Digits at a tiny budget (2 seeds, 1 epoch per task, few FPF steps)."""
from __future__ import annotations

import json

import pytest

from benchmarks import continual_fpf as cf

from ._helpers import check_png, load_json

TINY = ["--benchmark", "seq-digits", "--epochs", "1", "--fpf-steps", "5", "--kfpf-steps", "2"]
VERDICTS = {"holds", "holds on the mean only", "within noise", "does not hold"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual") / "continual.json"
    assert cf.main([*TINY, "--seeds", "0", "1", "--out", str(out)]) == out
    return out


def test_writes_json_with_validation_selection_and_verdicts(tiny):
    result = load_json(tiny)
    assert result["seeds"] == [0, 1] and set(result["benchmarks"]) == {"seq-digits"}
    bench = result["benchmarks"]["seq-digits"]
    assert bench["methods"] == [*cf.MAIN_METHODS, *cf.KFPF_METHODS, cf.ALL_MODULES]
    config = bench["config"]
    assert config["epochs"] == 1 and config["fpf"]["steps"] == 5 and config["kfpf_steps"] == 2  # the budget reached it
    assert bench["budget"]["epochs_per_task"] == 1 and len(bench["budget"]["train_steps_per_task"]) == 5
    v = bench["validation"]
    assert v["fraction"] == cf.VALID_FRACTION and all(n > 0 for n in v["valid_per_task"])
    for method in bench["methods"]:
        rows = bench["per_seed"][method]
        assert len(rows) == 2 and all(0 <= r["final_average_accuracy"] <= 1 for r in rows)
        assert all(r["valid_accuracy_matrix"] is not None for r in rows)  # every method trained on the reduced split
    sel = bench["selection"]
    points = cf.grid_points(cf.GRIDS["seq-digits"])
    for m in cf.KFPF_METHODS:
        scores = sel[m]["grid_scores"]
        assert len(scores) == len(points) and sel[m]["chosen"] in points
        assert all(len(s["valid_per_seed"]) == 2 and "test" not in json.dumps(s) for s in scores)
        assert sel[m]["valid_mean"] == max(s["valid_mean"] for s in scores)
        chosen = bench["method_configs"][m]
        assert {k: chosen[k] for k in sel[m]["chosen"]} == sel[m]["chosen"]  # the reported rows ran the chosen point
    for key, c in bench["claims"].items():
        assert c["verdict"] in VERDICTS and len(c["per_seed"]) == 2, key
    assert {"fpf_improves_er", "fpf_improves_derpp", "kfpf_comparable_to_er+fpf", "kfpf-kd_comparable_to_derpp+fpf",
            "kfpf_fewer_flops_than_er+fpf", "fpf_beats_finetune_all"} <= set(bench["claims"])
    width, height = check_png(tiny.with_suffix(".png"))
    assert width > height  # one row of panels


def test_seed_shards_merge_to_the_same_result(tiny, tmp_path):
    raws = []
    for seed in (1, 0):
        raws.append(tmp_path / f"raw{seed}.json")
        cf.main([*TINY, "--seeds", str(seed), "--raw-out", str(raws[-1])])
    out = tmp_path / "merged.json"
    cf.main(["--from-raw", *map(str, raws), "--out", str(out)])
    whole, merged = (load_json(p)["benchmarks"]["seq-digits"] for p in (tiny, out))
    assert merged["seeds"] == [0, 1]
    assert merged["selection"] == whole["selection"]
    assert {k: c["per_seed"] for k, c in merged["claims"].items()} == {k: c["per_seed"] for k, c in
                                                                       whole["claims"].items()}


def test_readme_results_regenerated_from_the_json(tiny, tmp_path):
    readme = tmp_path / "README.md"
    before = ("# x\n<!-- section:continual -->\n## C\n\nintro 1.0\n\n### Results (old)\n\nold 99.9\n\n"
              "Tests (`tests/continual/`, ...): kept.\n<!-- /section:continual -->\nafter 7\n")
    readme.write_text(before)
    cf.main(["--no-run", "--out", str(tiny), "--readme", str(readme)])
    text = readme.read_text()
    assert "old 99.9" not in text and "intro 1.0" in text and "kept." in text and text.endswith("after 7\n")
    bench = load_json(tiny)["benchmarks"]["seq-digits"]
    assert cf.markdown(load_json(tiny)) in text
    c = bench["claims"]["fpf_improves_er"]
    assert f"{100 * c['mean']:+.1f}" in text and c["verdict"] in text


@pytest.mark.parametrize("d, expected", [([0.1, 0.12, 0.09], "holds"), ([0.3, -0.01, 0.3, 0.3, 0.3], "holds on the "
                                         "mean only"), ([0.1, -0.1, 0.05], "within noise"),
                                         ([-0.1, -0.12, -0.09], "does not hold"), ([0.0, 0.0], "within noise")])
def test_verdict_rules(d, expected):
    assert cf.verdict(d) == expected


def test_comparable_uses_the_margin():
    c = cf._claim("s", "comparable", "a", "b", [-0.01, -0.015, -0.012], -cf.COMPARABLE_MARGIN, "accuracy")
    assert c["verdict"] == "holds" and c["mean"] < 0  # 1-1.5 points below: within the 2-point margin
