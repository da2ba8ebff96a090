"""Memory-efficient training: GaLore, 8-bit AdamW, zeroth-order (MeZO, Sparse MeZO, SPSA-GC), ladder side-tuning
and IST against LoRA and full fine-tuning on one task, same data and step budget, lr chosen on validation.

    python -m benchmarks.memory [--task fortunes|define] [--methods full,lora,...] [--seeds 2] [--workers 1]
                                [--max-steps 100] [--out PATH]

Every run is a child process (benchmarks/memory_child.py) of the project's trainer with one torch thread and
glibc's allocator pinned (MALLOC_ENV), reporting the test score, the validation curve, the step time
(training seconds / steps), the process peak that training adds above the built model (VmHWM reset when
training begins), and torch's own split: weights, gradients alive at the optimizer step, optimizer state,
tensors autograd saves in one step (activations). One more child measures inference of the same model (no
autograd, the training batch size). Selection as in benchmarks/lora_family.py (its `run_all`): each method's
lr grid with seed 0, widened at an edge, the best validation score kept; seeds 1.. train at that point; test
data never chooses. Full-weight methods (full, GaLore, 8-bit AdamW, zeroth-order) train every weight except
the embeddings (their AdamW state would otherwise dominate every optimizer-state figure); the classifier head
trains in every run. Zeroth-order runs use their own lr for the head too (no separate head group). Finished
runs are cached (JSON lines) so a stopped sweep continues. benchmarks/memory_report.py writes the verdicts,
the markdown and the PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .lora_family import RESULTS, ROOT, TASKS, Task, _fields, choose, run_all
from .lora_family_report import label

MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
FULL_GRID = [1e-5, 3e-5, 1e-4]
GALORE_GRID = [3e-5, 1e-4, 3e-4]  # GaLore's update is scaled by 0.25: its lrs sit above full fine-tuning's
ADAPTER_GRID = [3e-4, 1e-3, 3e-3]
ZO_GRID = [1e-5, 1e-4, 1e-3]
NO_EMBEDDINGS = {"fortunes": [r"encoder\.", r"pooler\.", r"classifier\."], "define": [r"\.layers\.", r"\.norm\."]}


def methods(task_name: str, task: Task) -> dict[str, tuple[dict, list[float], list[str]]]:
    """name -> (method section, lr grid, extra overrides)."""
    full = {"name": "full", "trainable": NO_EMBEDDINGS[task_name]}
    lora = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1 if task_name == "fortunes" else 0.0,
            "target_modules": task.targets}

    def opt(name: str, **fields) -> list[str]:
        extra = ["--optimizer.name", name]
        for section, values in fields.items():
            for k, v in values.items():
                extra += [f"--optimizer.{section}.{k}", json.dumps(v)]
        return extra

    zo_head = ["--optimizer.groups", "[]"]
    galore = {"galore": {"rank": 128, "update_proj_gap": 200, "scale": 0.25}}
    return {
        "full": (full, FULL_GRID, []),
        "lora": (lora, ADAPTER_GRID, []),
        "galore": (full, GALORE_GRID, opt("galore_adamw", **galore)),
        "galore8bit": (full, GALORE_GRID, opt("galore_adamw8bit", **galore)),
        "adamw8bit": (full, FULL_GRID, opt("adamw8bit")),
        "mezo": (full, ZO_GRID, opt("mezo") + zo_head),
        "sparse_mezo": (full, ZO_GRID, opt("sparse_mezo") + zo_head),
        "spsa_gc": (full, ZO_GRID, opt("spsa_gc") + zo_head),
        "lst": ({"name": "lst", "reduction_factor": 8}, ADAPTER_GRID, []),
        "ist": ({"name": "ist", "r": 8, "target_modules": task.targets}, ADAPTER_GRID, []),
    }


def child_env() -> dict:
    return {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _child(args: list[str]) -> tuple[dict | None, str]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_child", *args], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, check=False)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def train_one(task: Task, table: dict, job: tuple, work: Path, budget: list[str]) -> dict:
    """One training child at the job's point and seed; the row run_all and the report read."""
    name, key, seed = job
    point = json.loads(key)
    section, _, extra = table[name]
    out = work / f"{name}-{label(point).replace(' ', '-')}-s{seed}"
    start = time.perf_counter()
    res, error = _child(["train", str(task.config), "--method", json.dumps({**section, **_fields(point)}),
                         "--optimizer.lr", repr(point["lr"]), "--seed", str(seed), "--threads", "1",
                         "--log_every", "5", "--output_dir", str(out), *extra, *budget])
    shutil.rmtree(out, ignore_errors=True)
    if res is None:
        return {"method": name, "lr": point["lr"], "seed": seed, "error": [error]}
    m, s = task.metric, res["summary"]
    return {"method": name, "lr": point["lr"], "seed": seed, "metric": m, "test_accuracy": s["test"][m],
            "valid_accuracy": s["valid"][m], "trainable_params": s["trainable_params"], "steps": s["steps"],
            "step_seconds": s["train_seconds"] / max(1, s["steps"]), "wall_seconds": round(time.perf_counter() - start, 1),
            "valid_curve": [[r["step"], r[m]] for r in res["curve"]], "loss_curve": res["loss_curve"],
            **{k: res[k] for k in ("train_peak_mb", "weights_mb", "gradients_mb", "optimizer_state_mb",
                                   "activations_mb", "optimizer")}}


def inference_reference(task: Task, budget: list[str], runs: int = 3) -> dict:
    """Peak of no-grad forwards of the full-weight model at the training batch size (median of `runs` children)."""
    rows = []
    for _ in range(runs):
        res, error = _child(["inference", str(task.config), "--method", json.dumps({"name": "full"}), *budget])
        if res is None:
            raise RuntimeError(f"inference child failed: {error}")
        rows.append(res)
    peaks = sorted(r["inference_peak_mb"] for r in rows)
    return {**rows[0], "inference_peak_mb": peaks[len(peaks) // 2], "inference_peaks_mb": peaks}


def main(argv: list[str] | None = None) -> Path:
    """Train, select, measure and write the JSON + markdown + PNG."""
    from . import memory_report as report
    from .common import write_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fortunes",
                        help="fortunes: MiniLM topic classification (accuracy); define: SmolLM2 word definitions")
    parser.add_argument("--methods", default=",".join(methods("fortunes", TASKS["fortunes"])))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="training children at once (one thread each)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--extend-edges", type=int, default=1)
    parser.add_argument("--max-examples", type=int, help="define: words")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    table = methods(args.task, task)
    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(table))
    if unknown or not {"lora", "full"} <= set(names):
        parser.error(f"--methods: unknown {unknown}" if unknown else "--methods: must include full and lora")
    out = args.out or RESULTS / ("memory.json" if args.task == "fortunes" else f"memory_{args.task}.json")
    batch = "16" if args.task == "fortunes" else "8"
    budget = ["--max_steps", str(args.max_steps), "--eval_every", str(args.eval_every), "--eval_batch_size", batch]
    if args.max_examples:
        budget += ["--data.max_examples", str(args.max_examples)]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = {"trained": 0, "reused": 0}
    rows = run_all(task, table, names, args.seeds, args.workers, budget, out.with_suffix(".runs.jsonl"),
                   extend=args.extend_edges, counts=counts, train=train_one)
    infer = inference_reference(task, budget)
    res = report.summarise(rows, choose(rows), infer)
    res.update({"task": args.task, "metric": task.metric, "budget": budget, "seeds": args.seeds,
                "workers": args.workers, "grids": {n: table[n][1] for n in names},
                "sections": {n: [table[n][0], table[n][2]] for n in names}, "malloc_env": MALLOC_ENV,
                "runs_trained": counts["trained"], "runs_reused": counts["reused"],
                "seconds": round(time.perf_counter() - start, 1),
                "command": "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])})
    return write_outputs(out, res, report.markdown, report.plot)


if __name__ == "__main__":
    main()
