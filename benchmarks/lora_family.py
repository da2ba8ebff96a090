"""The LoRA family on the default fortunes task: every method through `unipeft train`, lr chosen on validation.

    python -m benchmarks.lora_family [--methods lora,pissa,...] [--seeds 3] [--workers 2] [--out PATH]

Each method trains examples/fortunes_lora.yaml with its own `method` section (rank 8 where the
method has a rank, the shipped target modules, the classifier head trained in full as in every
run) as a `unipeft train` child process with one torch thread; `--workers` children run at once.
Selection: every learning rate of the method's declared grid trains with seed 0 and the one with
the best validation accuracy (ties: the smaller lr) is kept; seeds 1..N-1 then train at that lr.
The test split is read only for the reported accuracy. Measured per run: test accuracy, trainable
parameters (and those of the adapter without the head), adapter file size, step time (training
seconds / steps), the validation curve (every --eval-every steps) and the training loss curve.
benchmarks/lora_family_report.py turns the runs into the verdicts, the markdown and the PNG.

--max-steps / --max-per-category shrink the budget, only to check the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
OUT = ROOT / "benchmarks" / "results" / "lora_family.json"
TARGETS = ["query", "key", "value", "dense"]
LORA_GRID = [3e-4, 1e-3, 3e-3]  # A/B matrices
VECTOR_GRID = [3e-3, 1e-2, 3e-2]  # methods that train only vectors or mixing coefficients
CALIBRATE = ["--calibration.batches", "8"]  # data-aware inits read 8 training batches
# The rank-growing methods end at LoRA's total rank: 8 for each of MiniLM's 36 targeted linears (6 layers x
# query, key, value, attention / intermediate / output dense); their scale alpha is LoRA's alpha/r = 2.
RANK_BUDGET = 8 * 36


def _lora(**fields) -> dict:
    return {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": TARGETS, **fields}


# name -> (method section, lr grid, extra overrides). Rank 8 where a method has one; the shared-basis
# methods use the rank their papers and PEFT default to (their trainable count does not grow with it) and
# store only what their seeds cannot regenerate (save_projection False, VB-LoRA's top-k weights).
METHODS: dict[str, tuple[dict, list[float], list[str]]] = {
    "lora": (_lora(), LORA_GRID, []),
    "pissa": (_lora(init="pissa"), LORA_GRID, []),
    "olora": (_lora(init="olora"), LORA_GRID, []),
    "milora": (_lora(init="milora"), LORA_GRID, []),
    "nlora": (_lora(init="nlora"), LORA_GRID, []),
    "corda": (_lora(init="corda"), LORA_GRID, CALIBRATE),
    "eva": (_lora(init="eva"), LORA_GRID, CALIBRATE),
    "lora_ga": (_lora(init="lora_ga"), LORA_GRID, CALIBRATE),
    "sorsa": (_lora(init="sorsa"), LORA_GRID, []),
    "kasa": (_lora(kasa_config={}), LORA_GRID, []),
    "loldu": (_lora(init="loldu"), VECTOR_GRID, []),
    "svfit": (_lora(init="svfit"), VECTOR_GRID, []),
    "rslora": (_lora(use_rslora=True), LORA_GRID, []),
    "dora": (_lora(use_dora=True), LORA_GRID, []),
    "loraplus": ({**_lora(), "name": "loraplus", "loraplus_lr_ratio": 16}, LORA_GRID, []),
    "lora_fa": ({**_lora(), "name": "lora_fa"}, LORA_GRID, []),
    "delora": ({"name": "delora", "r": 8, "target_modules": TARGETS}, LORA_GRID, []),
    "vera": ({"name": "vera", "r": 256, "save_projection": False, "target_modules": TARGETS}, VECTOR_GRID, []),
    "vblora": ({"name": "vblora", "r": 8, "vector_length": 128, "save_only_topk_weights": True,
               "target_modules": TARGETS}, VECTOR_GRID, []),
    "nola": ({"name": "nola", "r": 8, "target_modules": TARGETS}, VECTOR_GRID, []),
    "randlora": ({"name": "randlora", "r": 32, "save_projection": False, "target_modules": TARGETS}, VECTOR_GRID, []),
    "mos": ({"name": "mos", "r": 8, "target_modules": TARGETS}, LORA_GRID, []),
    "s2lora": ({"name": "s2lora", "r": 8, "target_modules": TARGETS}, LORA_GRID, []),
    "adalora": ({"name": "adalora", "init_r": 12, "target_r": 8, "target_modules": TARGETS}, LORA_GRID, []),
    "increlora": ({"name": "increlora", "init_r": 2, "max_r": 16, "budget": RANK_BUDGET, "deltaT": 4, "top_h": 8,
                   "alpha": 2.0, "target_modules": TARGETS}, LORA_GRID, []),
    "sora": ({"name": "sora", "r": 8, "alpha": 16, "target_modules": TARGETS}, LORA_GRID, []),
    "triadaptlora": ({"name": "triadaptlora", "init_r": 2, "max_r": 16, "budget": RANK_BUDGET, "alpha": 2.0,
                      "target_modules": TARGETS}, LORA_GRID, []),
}


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
                head += _numel(f.get_slice(key).get_shape())
    return {"file_bytes": file.stat().st_size, "head_params": head}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def train_one(name: str, lr: float, seed: int, work: Path, budget: list[str], eval_every: int) -> dict:
    """One `unipeft train` child: the method's section at `lr` and `seed`; its measurements."""
    section, _, extra = METHODS[name]
    out = work / f"{name}-lr{lr:g}-s{seed}"
    cmd = [sys.executable, "-m", "unipeft", "train", str(CONFIG), "--method", json.dumps(section),
           "--optimizer.lr", repr(lr), "--seed", str(seed), "--threads", "1", "--eval_every", str(eval_every),
           "--log_every", "5", "--output_dir", str(out), "--overwrite", *extra, *budget]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"method": name, "lr": lr, "seed": seed, "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    summary = json.loads((out / "summary.json").read_text())
    records = _read_jsonl(out / "metrics.jsonl")
    sizes = adapter_sizes(out / "adapter")
    row = {"method": name, "lr": lr, "seed": seed, "test_accuracy": summary["test"]["accuracy"],
           "valid_accuracy": summary["valid"]["accuracy"], "trainable_params": summary["trainable_params"],
           "adapter_params": summary["trainable_params"] - sizes["head_params"], "file_bytes": sizes["file_bytes"],
           "steps": summary["steps"], "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1),
           "step_seconds": summary["train_seconds"] / max(1, summary["steps"]),
           "valid_curve": [[r["step"], r["accuracy"]] for r in records if r.get("split") == "valid"],
           "loss_curve": [[r["step"], r["loss"]] for r in records if "split" not in r and "loss" in r]}
    shutil.rmtree(out, ignore_errors=True)
    return row


def run_all(names: list[str], seeds: int, workers: int, budget: list[str], eval_every: int,
            log=print) -> list[dict]:
    """The lr grid (seed 0) of every method, then seeds 1.. at each method's chosen lr."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lora-family-") as tmp, ThreadPoolExecutor(workers) as pool:
        work = Path(tmp)

        def launch(jobs):
            for row in pool.map(lambda j: train_one(*j, work, budget, eval_every), jobs):
                rows.append(row)
                shown = row.get("error") or f"valid {row['valid_accuracy']:.3f} test {row['test_accuracy']:.3f}"
                log(f"{row['method']} lr={row['lr']:g} seed={row['seed']}: {shown}")

        launch([(n, lr, 0) for n in names for lr in METHODS[n][1]])
        chosen = choose_lr(rows)
        launch([(n, chosen[n], s) for n in names if n in chosen for s in range(1, seeds)])
    return rows


def choose_lr(rows: list[dict]) -> dict[str, float]:
    """Per method: the seed-0 lr with the best validation accuracy (ties: the smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["seed"] != 0 or "error" in r:
            continue
        key = (r["valid_accuracy"], -r["lr"])
        if r["method"] not in best or key > best[r["method"]]:
            best[r["method"]] = key
    return {m: -k[1] for m, k in best.items()}


def main(argv: list[str] | None = None) -> Path:
    """Train, select, and write the JSON + markdown + PNG."""
    from . import lora_family_report as report
    from .common import write_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="training children at once (one thread each)")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between validation evaluations")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-per-category", type=int)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or "lora" not in names:
        parser.error(f"--methods: unknown {unknown}" if unknown else "--methods: must include lora (the reference)")
    budget = ([] if args.max_steps is None else ["--max_steps", str(args.max_steps)]) + \
        ([] if args.max_per_category is None else ["--data.max_per_category", str(args.max_per_category)])
    start = time.perf_counter()
    rows = run_all(names, args.seeds, args.workers, budget, args.eval_every)
    res = report.summarise(rows, choose_lr(rows), {n: METHODS[n] for n in names})
    res.update(report.metadata(args, time.perf_counter() - start, CONFIG.relative_to(ROOT)))
    return write_outputs(args.out, res, report.markdown, report.plot)


if __name__ == "__main__":
    main()
