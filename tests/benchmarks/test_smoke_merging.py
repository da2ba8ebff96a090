"""benchmarks/merging.py end to end in --quick mode (JSON structure, markdown, PNG, the run cache), and
benchmarks/merging_report.py on a hand-made result whose every figure is known."""
from __future__ import annotations

import pytest

from benchmarks import merging, merging_report

from ._helpers import check_png, load_json

TASKS = list(merging.TASKS)


@pytest.mark.slow
def test_quick_run_writes_results_and_reuses_finished_work(tmp_path):
    out, work = tmp_path / "merging.json", tmp_path / "work"
    args = ["--quick", "--out", str(out), "--work", str(work)]
    assert merging.main(args) == out
    res = load_json(out)
    q = merging.QUICK
    assert res["seeds"] == 1 and res["quick"] and res["budget"] == q["budget"]
    assert res["lrs"] == {"task": q["lora"][0], "multitask": q["lora"][0], "full": q["full"][0]}
    (ps,) = res["per_seed"]
    assert set(ps["merges"]) == set(merging.MERGES) | {"atlas"}
    for name, row in ps["merges"].items():
        assert set(row["test"]["tasks"]) == set(TASKS), name
        assert all(0 <= a <= 1 for a in row["test"]["tasks"].values())
        if name != "atlas":
            assert row["lambda"] == q["grid"][0] and set(row["grid"]) == {f"{q['grid'][0]:g}"}
    assert ps["merges"]["atlas"]["steps"] == q["atlas_steps"] and ps["merges"]["atlas"]["batches"] >= 1
    assert all(set(ps["individual"][t]["tasks"]) == {t} for t in TASKS)  # each adapter scored on its own task
    assert set(ps["compression"]) == {f"{d:g}" for d in q["densities"]}
    for d, c in ps["compression"].items():
        assert c["summary"]["density"] == float(d) and c["summary"]["ratio"] > 1
        assert c["summary"]["bytes_after"] < c["summary"]["bytes_before"] == ps["multitask_bytes"]
    ranks = ps["full"]["ranks"]
    assert set(ranks) == {str(r) for r in q["ranks"]}
    assert [ranks[str(r)]["summary"]["rank"] for r in q["ranks"]] == q["ranks"]
    params = [ranks[str(r)]["summary"]["total_params"] for r in q["ranks"]]
    assert params == sorted(params) and params[0] < params[-1]
    assert ranks[str(q["ranks"][0])]["summary"]["layers"] == 6  # every Linear the LoRA targets (--quick: layer 5)
    s = res["summary"]
    assert set(s["methods"]) == {"individual", "multitask", "base", *merging.MERGES, "atlas"}
    assert len(s["findings"]) >= 6 and any(f.startswith("ComPEFT") for f in s["findings"])
    md = out.with_suffix(".md").read_text()
    assert merging_report.COMMAND in md and "| density | ratio |" in md and "| rank |" in md
    check_png(out.with_suffix(".png"))
    cache = out.with_suffix(".runs.jsonl")
    lines = len(cache.read_text().splitlines())
    again = tmp_path / "again.json"
    merging.main(["--quick", "--out", str(again), "--cache", str(cache), "--work", str(work)])
    redo = load_json(again)
    assert redo["runs_computed"] == 0 and len(cache.read_text().splitlines()) == lines
    assert redo["per_seed"] == res["per_seed"]


def _scores(tasks: dict[str, float], accuracy: float = 0.0) -> dict:
    return {"accuracy": accuracy, "tasks": tasks, "task_mean": sum(tasks.values()) / len(tasks)}


def _flat(x: float) -> dict:
    return {t: x for t in TASKS}


def _synthetic() -> dict:
    """Two seeds; every cell chosen so the bands and verdicts can be worked out by hand."""
    per_seed = []
    for seed, ind in ((0, 0.9), (1, 0.8)):
        per_seed.append({
            "seed": seed, "base": _scores(_flat(0.5)), "multitask": _scores(_flat(ind), 0.80 + 0.02 * seed),
            "individual": {t: _scores({t: ind}) for t in TASKS},
            "merges": {"worse": {"lambda": 0.5, "test": _scores(_flat(ind - 0.05))},
                       "better": {"lambda": 1.0, "test": _scores(_flat(ind + 0.01))}},
            "compression": {"0.05": {"summary": {"ratio": 40.0}, "test": {"accuracy": 0.70 + 0.02 * seed}},
                            "0.1": {"summary": {"ratio": 20.0}, "test": {"accuracy": 0.795 + 0.02 * seed}}},
            "full": {"test": {"accuracy": 0.9}, "ranks": {"4": {"test": {"accuracy": 0.80 + 0.02 * seed}},
                                                          "8": {"test": {"accuracy": 0.895 + 0.005 * seed}}}}})
    return {"tasks": dict(merging.TASKS), "per_seed": per_seed, "seeds": 2, "quick": False, "seconds": 1.0,
            "runs_computed": 3, "runs_reused": 0, "budget": [], "examples": {"train": 1, "valid": 1, "test": 1},
            "config": "examples/fortunes_lora.yaml", "lrs": {"task": 1e-3, "multitask": 3e-3, "full": 1e-4}}


def test_report_bands_verdicts_and_findings_come_from_the_numbers(tmp_path):
    res = _synthetic()
    res.update(merging_report.summarise(res))
    s = res["summary"]
    ind = s["methods"]["individual"]["mean"]
    assert ind["mean"] == pytest.approx(0.85, abs=1e-12) and ind["pm"] == pytest.approx(0.1, abs=1e-12)
    worse, better = s["methods"]["worse"], s["methods"]["better"]
    assert worse["minus_individual"]["mean"] == pytest.approx(-0.05, abs=1e-12)
    assert worse["minus_individual"]["verdict"] == merging_report.FAILS
    assert better["minus_individual"]["verdict"] == merging_report.HOLDS
    assert worse["lambda"] == [0.5, 0.5] and "lambda" not in s["methods"]["multitask"]
    assert better["normalized"]["mean"] == pytest.approx((0.91 / 0.9 + 0.81 / 0.8) / 2, abs=1e-12)
    comp = s["compression"]
    assert comp["0.1"]["drop"]["values"] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert comp["0.1"]["verdict"] == merging_report.HOLDS and comp["0.05"]["verdict"] == merging_report.FAILS
    assert comp["0.05"]["ratio"]["mean"] == 40.0
    ext = s["extraction"]
    assert ext["4"]["relative"]["values"] == pytest.approx([0.8 / 0.9, 0.82 / 0.9], abs=1e-12)
    assert ext["4"]["verdict"] == merging_report.FAILS and ext["8"]["verdict"] == merging_report.HOLDS
    f = s["findings"]
    assert f[0].startswith("Highest mean test task accuracy among the merges: better (0.860 ± 0.100)")
    assert "Against the individual adapters: 1 of 2 merges are lower beyond the band, 0 within noise, 1 higher " \
           "(better)." in f
    assert any(x.startswith("ComPEFT: density 0.1 is the smallest tested") and "20.0x smaller" in x for x in f)
    assert "Target 8-50x smaller with <= 1 point lost: holds (densities in that ratio range: 0.05 at 40.0x: " \
           "does not hold, 0.1 at 20.0x: holds)." in f
    assert any(x.startswith("LoRA extraction: rank 8 is the smallest rank") for x in f)
    md = merging_report.markdown(res)
    assert "| better | 0.860 ± 0.100 |" in md and "| 0.1 | 20.0x | 0.805 ± 0.020 | 0.5 ± 0.0 | holds |" in md
    assert "| 4 | 0.810 ± 0.020 |" in md and merging_report.COMMAND in md
    merging_report.plot(res, tmp_path / "m.png")
    check_png(tmp_path / "m.png")


def test_report_says_when_no_density_keeps_the_target():
    res = _synthetic()
    for ps in res["per_seed"]:
        ps["compression"]["0.1"]["test"]["accuracy"] -= 0.2
    f = merging_report.summarise(res)["summary"]["findings"]
    assert any(x.startswith("ComPEFT: no tested density keeps the drop <= 1 point") for x in f)
    assert "Target 8-50x smaller with <= 1 point lost: does not hold" in " ".join(f)
