"""The LoRA family on a shipped task: every method through `unipeft train`, lr chosen on validation.

    python -m benchmarks.lora_family [--task fortunes|define] [--methods lora,pissa,...] [--seeds 3]
                                     [--workers 2] [--out PATH] [--cache PATH]

Each method trains the task's shipped config (fortunes: examples/fortunes_lora.yaml, MiniLM,
accuracy; define: examples/smollm2_define.yaml, SmolLM2, token accuracy) with its own `method`
section (rank 8 where the method has a rank, the config's target modules; a classifier head
trains in full as in every classification run) as a `unipeft train` child process with one torch
thread; `--workers` children run at once. Selection: every point of the method's declared grid (a
learning rate, or a learning rate with method fields such as DeLoRA's lambda) trains with seed 0;
when the best validation score sits at the smallest or largest lr tried, the next lr of the
half-decade ladder beyond it trains too (`--extend-edges` times at most), and the point with the
best validation score (ties: the smaller lr) is kept; seeds 1..N-1 then train at that point. The test split is read only for the reported score. Measured
per run: test score, trainable parameters (and those of the adapter without the head), adapter
file size, step time (training seconds / steps), the validation curve (every --eval-every steps)
and the training loss curve. Finished runs are cached (JSON lines), so a sweep that stops continues
where it left off. benchmarks/lora_family_report.py turns the runs into the verdicts, the markdown
and the PNG.

--max-steps / --max-per-category / --max-examples shrink the budget (declared in the JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .lora_family_report import label

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LORA_GRID = [3e-4, 1e-3, 3e-3]  # A/B matrices
VECTOR_GRID = [3e-3, 1e-2, 3e-2]  # methods that train only vectors or mixing coefficients
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # where an edge extension steps
# DeLoRA bounds each update by lambda x the weight's column norms, so lambda is a strength chosen with the lr:
# PEFT's default lambda 15 on LoRA's grid, and the smaller bounds 1 and 3 at PEFT's advised larger lrs.
DELORA_GRID = LORA_GRID + [{"lr": lr, "delora_lambda": lam} for lam in (1, 3) for lr in (1e-3, 3e-3, 1e-2)]
CALIBRATE = ["--calibration.batches", "8"]  # data-aware inits read 8 training batches


@dataclass(frozen=True)
class Task:
    """A shipped run config and what the family's sections need to know about its model."""

    config: Path
    targets: list[str] | str
    modules: int  # linears the targets select: the rank-growing methods end at 8 ranks each, LoRA's total
    vector_length: int  # VB-LoRA's sub-vector length, dividing every targeted width
    metric: str  # the evaluation key compared (higher is better), valid and test
    budget: tuple[str, ...] = ()  # overrides of the shipped config, declared with the results


TASKS = {
    # MiniLM: 6 layers x (query, key, value, attention / intermediate / output dense); widths 384 and 1536.
    "fortunes": Task(ROOT / "examples" / "fortunes_lora.yaml", ["query", "key", "value", "dense"], 36, 128,
                     "accuracy"),
    # SmolLM2-135M: 30 layers x 7 linears; widths 576, 1536 and 192 (k/v).
    "define": Task(ROOT / "examples" / "smollm2_define.yaml", "all-linear", 210, 64, "token_accuracy"),
}


def methods(task: Task) -> dict[str, tuple[dict, list[float], list[str]]]:
    """name -> (method section, lr grid, extra overrides). Rank 8 where a method has one; the shared-basis
    methods use the rank their papers and PEFT default to (their trainable count does not grow with it)
    and store only what their seeds cannot regenerate (save_projection False, VB-LoRA's top-k weights);
    the rank-growing methods end at LoRA's total rank, their constant scale is LoRA's alpha/r = 2."""
    t, budget = task.targets, 8 * task.modules

    def lora(**fields) -> dict:
        return {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": t, **fields}

    return {
        "lora": (lora(), LORA_GRID, []),
        "pissa": (lora(init="pissa"), LORA_GRID, []),
        "olora": (lora(init="olora"), LORA_GRID, []),
        "milora": (lora(init="milora"), LORA_GRID, []),
        "nlora": (lora(init="nlora"), LORA_GRID, []),
        "corda": (lora(init="corda"), LORA_GRID, CALIBRATE),
        "eva": (lora(init="eva"), LORA_GRID, CALIBRATE),
        "lora_ga": (lora(init="lora_ga"), LORA_GRID, CALIBRATE),
        "sorsa": (lora(init="sorsa"), LORA_GRID, []),
        "kasa": (lora(kasa_config={}), LORA_GRID, []),
        "loldu": (lora(init="loldu"), VECTOR_GRID, []),
        "svfit": (lora(init="svfit"), VECTOR_GRID, []),
        "rslora": (lora(use_rslora=True), LORA_GRID, []),
        "dora": (lora(use_dora=True), LORA_GRID, []),
        "loraplus": ({**lora(), "name": "loraplus", "loraplus_lr_ratio": 16}, LORA_GRID, []),
        "lora_fa": ({**lora(), "name": "lora_fa"}, LORA_GRID, []),
        "delora": ({"name": "delora", "r": 8, "target_modules": t}, DELORA_GRID, []),
        "vera": ({"name": "vera", "r": 256, "save_projection": False, "target_modules": t}, VECTOR_GRID, []),
        "vblora": ({"name": "vblora", "r": 8, "vector_length": task.vector_length, "save_only_topk_weights": True,
                    "target_modules": t}, VECTOR_GRID, []),
        "nola": ({"name": "nola", "r": 8, "target_modules": t}, VECTOR_GRID, []),
        "randlora": ({"name": "randlora", "r": 32, "save_projection": False, "target_modules": t}, VECTOR_GRID, []),
        "mos": ({"name": "mos", "r": 8, "target_modules": t}, LORA_GRID, []),
        "s2lora": ({"name": "s2lora", "r": 8, "target_modules": t}, LORA_GRID, []),
        "adalora": ({"name": "adalora", "init_r": 12, "target_r": 8, "target_modules": t}, LORA_GRID, []),
        "increlora": ({"name": "increlora", "init_r": 2, "max_r": 16, "budget": budget, "deltaT": 4, "top_h": 8,
                       "alpha": 2.0, "target_modules": t}, LORA_GRID, []),
        "sora": ({"name": "sora", "r": 8, "alpha": 16, "target_modules": t}, LORA_GRID, []),
        "triadaptlora": ({"name": "triadaptlora", "init_r": 2, "max_r": 16, "budget": budget, "alpha": 2.0,
                          "target_modules": t}, LORA_GRID, []),
    }


METHODS = methods(TASKS["fortunes"])
CONFIG = TASKS["fortunes"].config


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_sizes(adapter_dir: Path) -> dict:
    """Bytes of the adapter file, and parameters stored for the classifier head (trained by every run)."""
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    head = 0
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            if ".classifier." in key:
                head += math.prod(f.get_slice(key).get_shape())
    return {"file_bytes": file.stat().st_size, "head_params": head}


def point_of(entry) -> dict:
    """A grid entry as a point: {"lr": x} for a bare learning rate, else the dict itself."""
    return dict(entry) if isinstance(entry, dict) else {"lr": entry}


def _fields(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "lr"}


def train_one(task: Task, table: dict, job: tuple, work: Path, budget: list[str]) -> dict:
    """One `unipeft train` child: the method's section with the point's fields, at its lr and `seed`."""
    name, key, seed = job
    point = json.loads(key)
    lr = point["lr"]
    section, _, extra = table[name]
    out = work / f"{name}-{label(point).replace(' ', '-')}-s{seed}"
    cmd = [sys.executable, "-m", "unipeft", "train", str(task.config), "--method",
           json.dumps({**section, **_fields(point)}),
           "--optimizer.lr", repr(lr), "--seed", str(seed), "--threads", "1", "--log_every", "5",
           "--output_dir", str(out), "--overwrite", "--quiet", *extra, *budget]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"method": name, "lr": lr, "seed": seed, "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    summary = json.loads((out / "summary.json").read_text())
    records = _read_jsonl(out / "metrics.jsonl")
    sizes = adapter_sizes(out / "adapter")
    m = task.metric
    row = {"method": name, "lr": lr, "seed": seed, "metric": m, "test_accuracy": summary["test"][m],
           "valid_accuracy": summary["valid"][m], "trainable_params": summary["trainable_params"],
           "adapter_params": summary["trainable_params"] - sizes["head_params"], "file_bytes": sizes["file_bytes"],
           "steps": summary["steps"], "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1),
           "step_seconds": summary["train_seconds"] / max(1, summary["steps"]),
           "valid_curve": [[r["step"], r[m]] for r in records if r.get("split") == "valid"],
           "loss_curve": [[r["step"], r["loss"]] for r in records if "split" not in r and "loss" in r]}
    if "perplexity" in summary["test"]:
        row["test_perplexity"] = summary["test"]["perplexity"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def _key(task: Task, table: dict, job: tuple, budget: list[str]) -> str:
    """What decides a run's result: config, method section (with the point's fields), lr, seed and budget (the
    cache key; a bare-lr point keys exactly as the section alone did)."""
    name, key, seed = job
    point = json.loads(key)
    section = {**table[name][0], **_fields(point)}
    return json.dumps([str(task.config.relative_to(ROOT)), name, section, table[name][2], point["lr"], seed, budget])


def _job(name: str, point: dict, seed: int) -> tuple:
    return name, json.dumps(point, sort_keys=True), seed


def run_all(task: Task, table: dict, names: list[str], seeds: int, workers: int, budget: list[str],
            cache: Path | None = None, log=print, extend: int = 2, counts: dict | None = None,
            train=None) -> list[dict]:
    """The grid (seed 0) of every method, widened at a chosen edge up to `extend` times, then seeds 1.. at
    each method's chosen point. Finished runs are appended to `cache` (JSON lines) and reused by a later call
    with the same key, so a long sweep can stop and continue. `counts` gets the numbers trained and reused.
    `train(task, table, job, work, budget) -> row` runs one point (default: a `unipeft train` child)."""
    train = train or train_one
    done: dict[str, dict] = {}
    if cache is not None and cache.exists():
        done = {r["key"]: r["row"] for r in _read_jsonl(cache)}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lora-family-") as tmp, ThreadPoolExecutor(workers) as pool:
        work = Path(tmp)

        def one(job):
            key = _key(task, table, job, budget)
            reused = key in done
            row = dict(done[key]) if reused else train(task, table, job, work, budget)
            return {**row, "point": json.loads(job[1]), "setting": label(json.loads(job[1]))}, key, reused

        def launch(jobs):
            for row, key, reused in pool.map(one, jobs):
                rows.append(row)
                if counts is not None:
                    counts["reused" if reused else "trained"] = counts.get("reused" if reused else "trained", 0) + 1
                if cache is not None and not reused and "error" not in row:
                    with cache.open("a") as f:
                        f.write(json.dumps({"key": key, "row": row}) + "\n")
                shown = row.get("error") or f"valid {row['valid_accuracy']:.3f} test {row['test_accuracy']:.3f}"
                log(f"{row['method']} {row['setting']} seed={row['seed']}{' (cached)' if reused else ''}: {shown}")

        launch([_job(n, point_of(e), 0) for n in names for e in table[n][1]])
        for _ in range(extend):
            wider = edge_points(rows)
            if not wider:
                break
            launch([_job(n, p, 0) for n, p in wider])
        chosen = choose(rows)
        launch([_job(n, chosen[n], s) for n in names if n in chosen for s in range(1, seeds)])
    return rows


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per method: the seed-0 point with the best validation score (ties: the smaller lr)."""
    best: dict[str, tuple] = {}
    for r in rows:
        if r["seed"] != 0 or "error" in r:
            continue
        point = r.get("point") or {"lr": r["lr"]}
        key = (r["valid_accuracy"], -point["lr"])
        if r["method"] not in best or key > best[r["method"]][0]:
            best[r["method"]] = (key, point)
    return {m: p for m, (_, p) in best.items()}


def edge_points(rows: list[dict]) -> list[tuple[str, dict]]:
    """For each method whose best seed-0 point has the smallest or largest lr tried with its fields, the next
    LADDER lr beyond that edge (not yet tried)."""
    out = []
    for name, point in choose(rows).items():
        tried = {r["point"]["lr"] for r in rows if r["method"] == name and r["seed"] == 0 and "point" in r
                 and _fields(r["point"]) == _fields(point)}
        lr = point["lr"]
        rung = min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))
        step = -1 if lr <= min(tried) else 1 if lr >= max(tried) else 0
        if step and 0 <= rung + step < len(LADDER) and LADDER[rung + step] not in tried:
            out.append((name, {**point, "lr": LADDER[rung + step]}))
    return out


def main(argv: list[str] | None = None) -> Path:
    """Train, select, and write the JSON + markdown + PNG."""
    from . import lora_family_report as report
    from .common import write_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fortunes",
                        help="fortunes: MiniLM topic classification (accuracy); define: SmolLM2 word definitions "
                             "(token accuracy)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="training children at once (one thread each)")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between validation evaluations")
    parser.add_argument("--extend-edges", type=int, default=2,
                        help="times a grid widens by one ladder lr where the best seed-0 point is at its edge")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-per-category", type=int, help="fortunes: entries per topic")
    parser.add_argument("--max-examples", type=int, help="define: words")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/lora_family[_TASK].json")
    parser.add_argument("--cache", type=Path, help="finished runs as JSON lines, reused when run again "
                                                   "(default: OUT with .runs.jsonl)")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    table = methods(task)
    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(table))
    if unknown or "lora" not in names:
        parser.error(f"--methods: unknown {unknown}" if unknown else "--methods: must include lora (the reference)")
    out = args.out or RESULTS / ("lora_family.json" if args.task == "fortunes" else f"lora_family_{args.task}.json")
    budget = [*task.budget, "--eval_every", str(args.eval_every)]
    for flag, key in (("max_steps", "--max_steps"), ("max_per_category", "--data.max_per_category"),
                      ("max_examples", "--data.max_examples")):
        if getattr(args, flag) is not None:
            budget += [key, str(getattr(args, flag))]
    start = time.perf_counter()
    counts = {"trained": 0, "reused": 0}
    rows = run_all(task, table, names, args.seeds, args.workers, budget, args.cache or out.with_suffix(".runs.jsonl"),
                   extend=args.extend_edges, counts=counts)
    res = report.summarise(rows, choose(rows), {n: table[n] for n in names})
    res.update(report.metadata(args, time.perf_counter() - start, task.config.relative_to(ROOT)))
    res.update({"task": args.task, "metric": task.metric, "budget": budget, "runs_trained": counts["trained"],
                "runs_reused": counts["reused"]})
    return write_outputs(out, res, report.markdown, report.plot)


if __name__ == "__main__":
    main()
