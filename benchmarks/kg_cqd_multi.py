"""CQD vs CQD^A over seeds and datasets: one benchmarks.kg_cqd run per (dataset, seed), then mean ± std and verdicts.

    python -m benchmarks.kg_cqd_multi [--datasets umls,kinships,nations] [--seeds 0,1,2] [--no-run] [--rerun]

Each run writes benchmarks/results/kg_cqd_<dataset>_seed<seed>.{json,md,png} (an existing run file is
reused unless --rerun; --no-run only aggregates). The aggregate goes to kg_cqd_multi.{json,md,png}.
Verdicts come from `verdict` alone, computed from the per-seed numbers; see VERDICT_RULES.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from . import kg_cqd

RESULTS = kg_cqd.RESULTS
DATASETS = ("umls", "kinships", "nations")
SEEDS = (0, 1, 2, 3, 4)  # runs take ~0.5-1 min each here, so five seeds rather than the minimum three
METHODS = {"cqd": "CQD", "cqda": "CQD^A", "one_percent": "CQD^A (1% of training queries)",
           "subset": f"CQD^A (trained on {', '.join(kg_cqd.SUBSET)} only)"}
METRICS = {"avg": "avg_mrr", "epfo": "avg_mrr_positive", "neg": "avg_mrr_negation"}
# (key, statement, kind, method A, method B, metric): the claim is about A - B on that metric.
CLAIMS = (
    ("cqda_beats_tuned_cqd_on_average", "CQD^A beats validation-tuned CQD on average MRR", "beats", "cqda", "cqd",
     "avg"),
    ("cqda_beats_tuned_cqd_on_negation", "CQD^A answers negation queries better than tuned CQD (avg over 2in 3in "
     "inp pin pni)", "beats", "cqda", "cqd", "neg"),
    ("cqda_beats_tuned_cqd_on_epfo", "CQD^A beats tuned CQD on the positive (EPFO) structures", "beats", "cqda",
     "cqd", "epfo"),
    ("one_percent_competitive", "CQD^A with 1% of the training queries is competitive with full CQD^A (average "
     "MRR within full CQD^A's seed noise band)", "matches", "one_percent", "cqda", "avg"),
    ("subset_generalises", "CQD^A trained on 1p/2p/2i/2in only beats tuned CQD on the 10 structures it never "
     "trained on", "beats", "subset", "cqd", "unseen"),
)
VERDICT_RULES = {
    "std": "sample standard deviation over seeds (n - 1 in the denominator); 0 with one seed",
    "d_s": "per-seed difference A - B of the claim's metric (test MRR, same predictor and queries for A and B)",
    "band (beats)": "max(std of A, std of B) over seeds",
    "band (matches)": "std of B (the reference) over seeds",
    "beats": "'within noise' if |mean d| <= band; else 'does not hold' if mean d < 0; else 'holds' if d_s > 0 on "
             "every seed, 'holds on the mean only' otherwise",
    "matches": "'does not hold' if mean d < -band; else 'holds' if d_s >= -band on every seed, 'holds on the mean "
               "only' otherwise",
}


def std(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(kind: str, diffs: list[float], band: float) -> str:
    """The one place verdict strings are made: VERDICT_RULES applied to per-seed differences."""
    mean = statistics.fmean(diffs)
    if kind == "beats":
        if abs(mean) <= band:
            return "within noise"
        if mean < 0:
            return "does not hold"
        return "holds" if all(d > 0 for d in diffs) else "holds on the mean only"
    if kind == "matches":
        if mean < -band:
            return "does not hold"
        return "holds" if all(d >= -band for d in diffs) else "holds on the mean only"
    raise ValueError(f"unknown claim kind {kind!r}")


def metric(res: dict, key: str) -> float:
    """One run's metric of one method; 'unseen' = mean MRR over the structures the subset calibrator never saw."""
    if key == "unseen":
        vals = [v["mrr"] for s, v in res["per_structure"].items() if s not in kg_cqd.SUBSET]
        return sum(vals) / len(vals)
    return res[METRICS[key]]


def summary(values: list[float]) -> dict:
    """Mean, std and the per-seed values, rounded for the JSON."""
    return {"mean": round(statistics.fmean(values), 4), "std": round(std(values), 4),
            "per_seed": [round(v, 4) for v in values]}


def aggregate(runs: dict[str, dict[int, dict]]) -> dict:
    """Per dataset: mean ± std of every method's metrics and per-structure MRR, CQD's choices, the verdicts."""
    out = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        payloads = [by_seed[s] for s in seeds]
        budgets = {json.dumps(p["budget"], sort_keys=True) for p in payloads}
        if len(budgets) != 1:  # seeds of one dataset must share the budget to be averaged
            raise ValueError(f"{name}: the seeds' runs have different budgets: {sorted(budgets)}")
        methods = {}
        for key, label in METHODS.items():
            res = [p["methods"][label] for p in payloads]
            structures = list(res[0]["per_structure"])
            methods[label] = {**{m: summary([metric(r, m) for r in res]) for m in (*METRICS, "unseen")},
                              "per_structure": {s: summary([r["per_structure"][s]["mrr"] for r in res])
                                                for s in structures}}
        claims = {}
        for key, statement, kind, a, b, m in CLAIMS:
            va, vb = methods[METHODS[a]][m]["per_seed"], methods[METHODS[b]][m]["per_seed"]
            diffs = [x - y for x, y in zip(va, vb)]
            band = max(std(va), std(vb)) if kind == "beats" else std(vb)
            claims[key] = {"statement": statement, "kind": kind, "a": METHODS[a], "b": METHODS[b], "metric": m,
                           "per_seed_difference": [round(d, 4) for d in diffs],
                           "mean_difference": round(statistics.fmean(diffs), 4), "band": round(band, 4),
                           "verdict": verdict(kind, diffs, band)}
        out[name] = {
            "seeds": seeds, "budget": payloads[0]["budget"],
            "queries_per_structure": {split: {s: v["queries"] for s, v in st.items()}
                                      for split, st in payloads[0]["queries"]["stats"].items() if split != "train"},
            "link_test_mrr": summary([p["link_predictor"]["test"]["mrr"] for p in payloads]),
            "cqd_chosen": {str(s): kg_cqd.setting_name(**p["cqd_selection"]["chosen"])
                           for s, p in zip(seeds, payloads)},
            "cqd_valid_avg_mrr": {str(s): {k: v["avg_mrr"] for k, v in p["cqd_selection"]["valid"].items()}
                                  for s, p in zip(seeds, payloads)},
            "cqda_best_step": {label: [p["calibrators"][label]["best_step"] for p in payloads]
                               for label in list(METHODS.values())[1:]},
            "methods": methods, "claims": claims,
            "run_seconds": {str(s): p["total_seconds"] for s, p in zip(seeds, payloads)},
        }
    return out


def _pm(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def markdown(payload: dict) -> str:
    """Tables per dataset: averages, per-structure MRR, CQD's choices and the verdicts."""
    lines = [f"CQD (tuned on validation over {payload['grid']}) vs CQD^A; test MRR (%) on hard answers, "
             "mean ± std over seeds", ""]
    for name, d in payload["datasets"].items():
        b = d["budget"]
        lines += [f"## {name}", "", f"Seeds {d['seeds']}; budget: {b['n_train']} train / {b['n_valid']} valid / "
                  f"{b['n_test']} test queries per structure (at most), {b['steps']} calibrator steps, ComplEx rank "
                  f"{b['rank']}, {b['link_epochs']} epochs (link test MRR {_pm(d['link_test_mrr'])}). CQD's setting "
                  f"per seed: " + ", ".join(f"{s}: {c}" for s, c in d["cqd_chosen"].items()) + ".", "",
                  "| method | avg | EPFO | negation | 10 unseen by the subset |", "|---|---|---|---|---|"]
        for label, m in d["methods"].items():
            lines.append(f"| {label} | {_pm(m['avg'])} | {_pm(m['epfo'])} | {_pm(m['neg'])} | {_pm(m['unseen'])} |")
        structures = list(next(iter(d["methods"].values()))["per_structure"])
        lines += ["", "| method | " + " | ".join(structures) + " |", "|---" * (len(structures) + 1) + "|"]
        for label, m in d["methods"].items():
            lines.append(f"| {label} | " + " | ".join(_pm(m["per_structure"][s]) for s in structures) + " |")
        lines += ["", "| claim | A − B per seed (MRR points) | mean | band | verdict |", "|---|---|---|---|---|"]
        for c in d["claims"].values():
            per = ", ".join(f"{100 * x:+.1f}" for x in c["per_seed_difference"])
            lines.append(f"| {c['statement']} | {per} | {100 * c['mean_difference']:+.1f} | {100 * c['band']:.1f} | "
                         f"{c['verdict']} |")
        lines.append("")
    lines += ["Verdict rules:", ""] + [f"- {k}: {v}" for k, v in payload["verdict_rules"].items()]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> Path:
    """Per dataset: per-structure test MRR and the three averages, mean ± std over seeds."""
    from .plots import bars, new_figure, save

    names = list(payload["datasets"])
    fig = new_figure(20, 4.2 * len(names), "CQD (tuned on validation) vs CQD^A: test MRR on hard answers, "
                                           "mean ± std over seeds")
    ax = fig.subplot_mosaic([[f"{n}/per", f"{n}/per", f"{n}/per", f"{n}/avg"] for n in names])
    for k, name in enumerate(names):
        d = payload["datasets"][name]
        methods = d["methods"]
        structures = list(next(iter(methods.values()))["per_structure"])
        bars(ax[f"{name}/per"], structures, {m: [r["per_structure"][s]["mean"] for s in structures]
                                             for m, r in methods.items()},
             errors={m: [r["per_structure"][s]["std"] for s in structures] for m, r in methods.items()},
             title=f"{name} (seeds {', '.join(map(str, d['seeds']))}): MRR per structure", ylabel="MRR")
        ax[f"{name}/per"].set_ylim(0, 1.3)  # MRR <= 1: the room above it holds the legend
        ax[f"{name}/per"].legend(ncols=4, loc="upper center", fontsize="small")
        if k:
            ax[f"{name}/per"].get_legend().remove()  # the same methods and colours in every row
        bars(ax[f"{name}/avg"], ["all", "EPFO", "negation"],
             {m: [r[x]["mean"] for x in METRICS] for m, r in methods.items()},
             errors={m: [r[x]["std"] for x in METRICS] for m, r in methods.items()},
             title=f"{name}: average MRR", ylabel="MRR", value_format="{:.2f}")
        ax[f"{name}/avg"].get_legend().remove()
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Run (or reuse) every (dataset, seed) of kg_cqd and write the aggregate JSON, markdown and PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--quick", action="store_true", help="kg_cqd's tiny sizes, to check the script runs")
    ap.add_argument("--no-run", action="store_true", help="only aggregate existing run files")
    ap.add_argument("--rerun", action="store_true", help="run even where a run file exists")
    ap.add_argument("--out", default="kg_cqd_multi", help="aggregate file stem in --out-dir")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args, passthrough = ap.parse_known_args(argv)  # e.g. --n-test 200 goes to every kg_cqd run
    t0 = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {}
    files: dict[str, dict[str, str]] = {}
    for name in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            path = args.out_dir / f"kg_cqd_{name}_seed{seed}.json"
            if args.rerun or not path.exists():
                if args.no_run:
                    raise FileNotFoundError(f"{path} is missing (run without --no-run to make it)")
                kg_cqd.main(["--dataset", name, "--seed", str(seed), "--out-dir", str(args.out_dir)]
                            + (["--quick"] if args.quick else []) + passthrough)
            runs.setdefault(name, {})[seed] = json.loads(path.read_text())
            files.setdefault(name, {})[str(seed)] = path.name
    payload = {"grid": kg_cqd.GRID, "cqd_selection": "per dataset and seed, the grid point with the best average "
                                                     "validation MRR over all 14 structures; test scored after",
               "cqda_selection": next(iter(next(iter(runs.values())).values()))["cqda_selection"],
               "verdict_rules": VERDICT_RULES, "runs": files, "datasets": aggregate(runs),
               "aggregate_seconds": round(time.perf_counter() - t0, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.out}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    (args.out_dir / f"{args.out}.md").write_text(text)
    plot(payload, path.with_suffix(".png"))
    print(text)
    return path


if __name__ == "__main__":
    main()
