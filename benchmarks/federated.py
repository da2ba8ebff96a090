"""Federated strategies on the fortunes task against centralised training with the same steps.

    python -m benchmarks.federated [--seeds 3] [--parallel 2]

8 clients (examples/federated_fortunes.yaml's split of the training set), ROUNDS rounds of LOCAL steps each:
ROUNDS x 8 x LOCAL optimizer steps of 16 examples in all, the budget the centralised run (`unipeft train` of
examples/fortunes_lora.yaml on the whole training split) gets too. Partitions: IID and Dirichlet(0.1) over the
topics. Every strategy and the centralised run pick their lr on seed 0's validation score from a declared grid
(per partition); seeds 1.. then run at it. The test split is read only for the reported scores. Finished runs
are kept in benchmarks/results/federated.runs.jsonl and reused by a rerun with the same settings.
Writes benchmarks/results/federated.{json,md,png}; every figure comes from these runs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .common import RESULTS, versions
from .federated_report import markdown, plot, summarise

ROOT = Path(__file__).resolve().parent.parent
FED_CONFIG = ROOT / "examples" / "federated_fortunes.yaml"
RUN_CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
CLIENTS, ROUNDS, LOCAL = 8, 8, 4
STRATEGIES = ("fedavg", "fedavg_exact", "ffa_lora", "lora_fair", "fedkseed")
PARTITIONS = {"iid": {"kind": "iid", "alpha": 1.0}, "dir0.1": {"kind": "dirichlet", "alpha": 0.1}}
GRIDS = {"lora": [3e-3, 1e-2], "fedkseed": [1e-4, 1e-3], "centralised": [1e-3, 3e-3, 1e-2]}


def grid(strategy: str) -> list[float]:
    return GRIDS["fedkseed"] if strategy == "fedkseed" else GRIDS["centralised" if strategy == "centralised"
                                                                  else "lora"]


def run_federated_point(strategy: str, part: str, lr: float, seed: int, parallel: int) -> dict:
    """One federated run; its per-round history and communication."""
    from unipeft.federated import load_federated_config, run_federated
    with tempfile.TemporaryDirectory(prefix="fed-bench-") as tmp:
        p = PARTITIONS[part]
        fed = load_federated_config(FED_CONFIG, [
            "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--local_steps", str(LOCAL),
            "--strategy.name", strategy, "--partition.kind", p["kind"], "--partition.alpha", str(p["alpha"]),
            "--partition.seed", str(seed), "--train.seed", str(seed), "--train.optimizer.lr", repr(lr),
            "--output_dir", tmp])
        t0 = time.perf_counter()
        hist = run_federated(fed, parallel, progress=False, log=lambda _: None)["history"]
        seconds = time.perf_counter() - t0
    rounds = [{k: r.get(k) for k in ("round", "valid_accuracy", "test_accuracy", "up_bytes", "down_bytes",
                                      "accepted", "train_loss", "product_gap")} for r in hist]
    return {"strategy": strategy, "partition": part, "lr": lr, "seed": seed, "rounds": rounds,
            "valid_accuracy": hist[-1]["valid_accuracy"], "test_accuracy": hist[-1]["test_accuracy"],
            "up_bytes": hist[-1]["up_bytes"], "down_bytes": hist[-1]["down_bytes"], "seconds": round(seconds, 1)}


def run_centralised_point(lr: float, seed: int, threads: int) -> dict:
    """`unipeft train` on the whole training split for the federation's total steps, evaluated per 'round'."""
    from unipeft.train.config import load_config
    from unipeft.train.run import train_run
    steps, every = ROUNDS * CLIENTS * LOCAL, CLIENTS * LOCAL
    with tempfile.TemporaryDirectory(prefix="central-bench-") as tmp:
        cfg = load_config(RUN_CONFIG, ["--max_steps", str(steps), "--eval_every", str(every), "--seed", str(seed),
                                       "--optimizer.lr", repr(lr), "--threads", str(threads),
                                       "--output_dir", str(Path(tmp) / "run")])
        t0 = time.perf_counter()
        summary = train_run(cfg, show_progress=False, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [{"round": r["step"] // every, "valid_accuracy": r["accuracy"]} for r in records if r.get("split") == "valid"]
    return {"strategy": "centralised", "partition": "all", "lr": lr, "seed": seed, "rounds": curve,
            "valid_accuracy": summary["valid"]["accuracy"], "test_accuracy": summary["test"]["accuracy"],
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="clients trained at once (Ray actors)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    args = parser.parse_args(argv)
    cache = args.out.with_suffix(".runs.jsonl")
    done = {}
    if cache.exists():
        done = {json.dumps(r["key"]): r["row"] for r in map(json.loads, cache.read_text().splitlines())}
    started = time.perf_counter()
    rows, counts = [], {"trained": 0, "reused": 0}

    def one(strategy, part, lr, seed):
        key = [strategy, part, lr, seed, CLIENTS, ROUNDS, LOCAL]
        k = json.dumps(key)
        if k in done:
            counts["reused"] += 1
            row = done[k]
        else:
            row = (run_centralised_point(lr, seed, args.parallel) if strategy == "centralised"
                   else run_federated_point(strategy, part, lr, seed, args.parallel))
            counts["trained"] += 1
            with cache.open("a") as f:
                f.write(json.dumps({"key": key, "row": row}) + "\n")
        print(f"{strategy} {part} lr={lr:g} seed={seed}: valid {row['valid_accuracy']:.3f} "
              f"test {row['test_accuracy']:.3f} ({row['seconds']} s)", flush=True)
        rows.append(row)
        return row

    settings = [("centralised", "all")] + [(s, p) for p in PARTITIONS for s in args.strategies.split(",")]
    chosen = {}
    for strategy, part in settings:
        points = [one(strategy, part, lr, 0) for lr in grid(strategy)]
        best = max(points, key=lambda r: (r["valid_accuracy"], -r["lr"]))
        chosen[f"{strategy}/{part}"] = best["lr"]
        for seed in range(1, args.seeds):
            one(strategy, part, best["lr"], seed)
    res = summarise(rows, chosen)
    res.update({"clients": CLIENTS, "rounds": ROUNDS, "local_steps": LOCAL, "grids": GRIDS, "partitions": PARTITIONS,
                "seeds": args.seeds, "runs_trained": counts["trained"], "runs_reused": counts["reused"],
                "seconds": round(time.perf_counter() - started, 1), "versions": versions(),
                "command": "python -m benchmarks.federated " + " ".join(argv or [])})
    from .common import write_outputs
    return write_outputs(args.out, res, markdown, plot)


if __name__ == "__main__":
    main()
