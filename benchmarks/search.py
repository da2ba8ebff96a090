"""Does configuration search find a smaller adapter as good as the default LoRA? NSGA-II vs random search.

    python -m benchmarks.search [--seeds 3] [--trials 12] [--workers 2]

On the fortunes task (examples/fortunes_lora.yaml) every trial and the reference train STEPS steps. The
reference is the default LoRA r=8 on query/key/value/dense (3 seeds). Each search (`unipeft search`, on its own
SQLite study) runs TRIALS trials over SPACE with the objectives validation accuracy and trainable parameters;
the same budget for NSGA-II and for random sampling, 3 sampler seeds each. From each finished search the
front member with at most 1/4 of the reference's trainable parameters and the best validation accuracy is
taken (validation only), retrained and tested on the test split (the search never reads it). The question
holds for a sampler when that test accuracy is >= the reference's mean test accuracy beyond 2 standard
errors of the per-seed differences, within noise when the band spans 0. Writes benchmarks/results/search.*.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from .common import RESULTS, versions, write_outputs
from .lora_family_report import judge, mean_se

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
STEPS = 60
SPACE = {
    "method": {
        "lora": {"r": [1, 2, 4, 8], "target_modules": [["query", "value"], ["value"], ["query", "key", "value", "dense"]],
                 "layers_to_transform": [[0, 1, 2, 3, 4, 5], [3, 4, 5]]},
        "ia3": {"target_modules": [["key", "value", "intermediate.dense"]],
                "feedforward_modules": [["intermediate.dense"]]},
    },
    "optimizer.lr": {"low": 3e-4, "high": 3e-2, "log": True},
}


def _train(cfg_data: dict, seed: int, out: Path) -> dict:
    from unipeft.train.config import config_from_dict
    from unipeft.train.run import train_run
    data = {**cfg_data, "max_steps": STEPS, "eval_every": STEPS // 3, "seed": seed, "output_dir": str(out)}
    return train_run(config_from_dict(data), overwrite=True, show_progress=False, log=lambda *_: None)


def reference(seeds: int, tmp: Path) -> list[dict]:
    base = yaml.safe_load(RUN_CONFIG.read_text())
    rows = []
    for s in range(seeds):
        summary = _train(base, s, tmp / f"ref-{s}")
        rows.append({"seed": s, "valid": summary["valid"]["accuracy"], "test": summary["test"]["accuracy"],
                     "trainable_params": summary["trainable_params"]})
    return rows


def one_search(sampler: str, seed: int, trials: int, workers: int, tmp: Path) -> dict:
    from unipeft.search.config import load_search
    from unipeft.search.report import trial_rows
    from unipeft.search.runner import run_search
    out = tmp / f"{sampler}-{seed}"
    cfg = {**yaml.safe_load(RUN_CONFIG.read_text()),
           "search": {"trials": trials, "sampler": sampler, "seed": seed, "objectives": ["valid_accuracy",
                                                                                       "trainable_params"],
                      "budget": {"max_steps": STEPS, "eval_every": STEPS // 3}, "space": SPACE,
                      "pruner": {"name": "median", "startup_trials": 4, "warmup_steps": STEPS // 3},
                      "output_dir": str(out)}}
    path = tmp / f"{sampler}-{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    study = run_search(load_search(path), str(path), workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    rows = trial_rows(study)
    return {"sampler": sampler, "seed": seed, "seconds": round(seconds, 1), "trials": [
        {k: r.get(k) for k in ("trial", "state", "params", "valid_accuracy", "trainable_params", "error")}
        for r in rows], "configs": {t.number: t.user_attrs.get("run_config") for t in study.get_trials()
                                    if t.values is not None}}


def pick_and_test(search: dict, limit: float, seed: int, tmp: Path) -> dict | None:
    """The complete trial with <= `limit` trainable parameters and the best validation accuracy, retrained on
    the reference's seed and tested."""
    ok = [t for t in search["trials"] if t["state"] == "COMPLETE" and t["trainable_params"] <= limit]
    if not ok:
        return None
    best = max(ok, key=lambda t: (t["valid_accuracy"], -t["trainable_params"]))
    cfg = dict(search["configs"][best["trial"]])
    cfg.pop("output_dir", None)
    summary = _train(cfg, seed, tmp / f"pick-{search['sampler']}-{search['seed']}")
    return {"trial": best["trial"], "params": best["params"], "valid": best["valid_accuracy"],
            "trainable_params": best["trainable_params"], "test": summary["test"]["accuracy"]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ref = reference(args.seeds, tmp)
        limit = ref[0]["trainable_params"] / 4
        ref_test = [r["test"] for r in ref]
        searches = {}
        for sampler in ("nsga2", "random"):
            runs = []
            for s in range(args.seeds):
                search = one_search(sampler, s, args.trials, args.workers, tmp)
                search["pick"] = pick_and_test(search, limit, s, tmp)
                print(f"{sampler} seed {s}: pick {search['pick']}", flush=True)
                runs.append(search)
            searches[sampler] = runs
    m, se = mean_se(ref_test)
    claims = {}
    for sampler, runs in searches.items():
        diffs = [r["pick"]["test"] - ref_test[r["seed"]] if r["pick"] else float("nan") for r in runs]
        found = [d for d in diffs if d == d]
        claims[sampler] = {**(judge(found) if len(found) == len(diffs) else
                              {"mean": float("nan"), "band": [float("nan")] * 2, "seeds": len(diffs),
                               "verdict": "no config at <= 1/4 of the parameters finished"}),
                           "per_seed": diffs, "found": len(found)}
    res = {"reference": {"runs": ref, "test_mean": m, "test_se": se, "trainable_params": ref[0]["trainable_params"],
                         "limit": limit}, "searches": searches, "claims": claims, "steps": STEPS, "space": SPACE,
           "trials": args.trials, "seeds": args.seeds, "workers": args.workers,
           "seconds": round(time.perf_counter() - started, 1), "versions": versions(),
           "command": "python -m benchmarks.search " + " ".join(argv or [])}
    from .search_report import markdown, plot
    return write_outputs(args.out, res, markdown, plot)


if __name__ == "__main__":
    main()
