"""DePT vs prompt tuning at equal trainable parameter count, on MiniLM + the 8-topic fortunes task.

DePT's claim (Shi & Lipani, ICLR 2024): replacing a prompt of L tokens by a shorter prompt of m
tokens plus a rank-r update of the input embeddings, at the same parameter count, saves over
20% of training/inference time and memory with accuracy at least as good. Here: L=100 vs m=60,
r=30 (the paper's setting; with d=384 and max_length=128 both have 38,400 prompt parameters),
the data config of examples/fortunes_lora.yaml, one CPU thread, the same step budget for both.

1. Search: each method's prompt lr is chosen from LR_GRID by validation accuracy (seed 0 only,
   the same budget for both; test figures are never read to choose). DePT's embedding-update lr
   is fixed at EMBED_LR (a second grid would double the search).
2. Comparison: seeds 0-4 at the chosen lrs (seed 0 reuses its search run: same config, same seed).
Each run is its own child process under MALLOC_ENV, reporting the median optimizer-step time, the
training peak memory (VmHWM at the last optimizer step minus the resident size when training
starts: no validation or test pass inside), the median of 3 timed inference passes on 64 test
examples, and the validation and test accuracy. Verdicts come from benchmarks/dept_verdict.py.

    python -m benchmarks.dept_repro [--steps 120] [--seeds 0 1 2 3 4] [--grid 1e-2 3e-2 1e-1] [--jobs 2] [--out DIR]

Writes dept_repro.json, dept_repro.md and dept_repro.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import RESULTS, versions
from .dept_verdict import judge, paired
from .memprobe import peak_mb_since, reset_peak

ROOT = Path(__file__).resolve().parent.parent
L_PROMPT, M_PROMPT, RANK, MAX_LENGTH = 100, 60, 30, 128
EMBED_LR, HEAD_LR, SEARCH_SEED = 1e-3, 3e-2, 0
LR_GRID = (1e-2, 3e-2, 1e-1)
METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": L_PROMPT, "init": "vocab"},
    "dept": {"name": "dept", "num_virtual_tokens": M_PROMPT, "rank": RANK, "max_length": MAX_LENGTH,
             "lr_embedding_update": EMBED_LR, "init": "vocab"},
}
# Pinned glibc malloc. Setting M_MMAP_THRESHOLD (or M_TRIM_THRESHOLD) disables glibc's *dynamic* mmap
# threshold, which otherwise rises up to 32 MB after large frees, so whether a freed activation goes
# back to the kernel or stays resident depends on allocation history (the unpinned peaks spread by
# ~200 MB over 3 seeds). Fixed at 128 KiB, every tensor buffer above it is its own mmap,
# unmapped on free, and VmHWM tracks the live peak. One arena: helper threads cannot add heaps.
# torch's DefaultCPUAllocator does not cache (posix_memalign/free; its caching allocator is mobile-only, opt-in).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SAVINGS = ("step_seconds", "peak_train_mb", "inference_seconds")
QUANTITIES = (("step_seconds", "train step (s, median)", "{:.3f}"),
              ("peak_train_mb", "training peak memory (MB)", "{:.0f}"),
              ("inference_seconds", "inference, 64 test examples (s)", "{:.2f}"),
              ("test_accuracy", "test accuracy", "{:.3f}"))


def run_config(method: str, seed: int, steps: int, out: str, lr: float, max_per_category: int | None = None):
    """examples/fortunes_lora.yaml with the method swapped in, a fixed step budget, prompt lr `lr`, one thread."""
    import yaml

    from unipeft.train.config import config_from_dict

    data = yaml.safe_load((ROOT / "examples" / "fortunes_lora.yaml").read_text())
    # eval_every beyond the budget: validation runs once, after the last step (and after the peak is read)
    data.update(method=dict(METHODS[method]), max_steps=steps, seed=seed, threads=1, output_dir=out,
                log_every=10_000, eval_every=10_000)
    if max_per_category is not None:  # fewer examples per topic: the smoke test's budget
        data["data"]["max_per_category"] = max_per_category
    data["optimizer"] = {"lr": lr, "weight_decay": 0.0, "groups": [{"params": "classifier", "lr": HEAD_LR}]}
    data["schedule"] = {"name": "linear", "warmup_ratio": 0.1}
    return config_from_dict(data)


def child(method: str, seed: int, steps: int, lr: float, max_per_category: int | None = None) -> dict:
    """Train one (method, seed, lr) and measure it; runs in a fresh process."""
    import torch

    from unipeft.train.callbacks import TrainerCallback
    from unipeft.train.evaluate import predict_rows
    from unipeft.train.run import train_run
    from unipeft.train.setup import build_parts

    torch.set_num_threads(1)

    class Probe(TrainerCallback):
        """Per-step wall times and the memory high-water mark of the optimizer steps alone."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.model, self.peak_mb = None, None

        def on_train_begin(self, ctx) -> None:
            self.rss0 = reset_peak()

        def on_step_begin(self, ctx) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, ctx) -> None:
            self.times.append(time.perf_counter() - self.t0)
            if ctx.step == steps:  # read before the trainer's validation pass can raise the mark
                self.peak_mb = peak_mb_since(self.rss0)

        def on_train_end(self, ctx) -> None:
            self.model = ctx.model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(method, seed, steps, str(Path(tmp) / "run"), lr, max_per_category)
        probe = Probe()
        summary = train_run(cfg, show_progress=False, callbacks=[probe], log=lambda *a: None)
        parts = build_parts(cfg)
        test = parts.encode("test")
        model = probe.model
        n_prompt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
        k = min(64, len(test))  # one eval batch: the timing, not the accuracy, needs it
        sub = type(test)(test.rows[:k], test.weights[:k], test.lengths[:k])
        infer = []
        for _ in range(3):  # warm already (train_run just evaluated the test set); median of 3 damps load spikes
            t0 = time.perf_counter()
            predict_rows(model, sub, "classification", cfg.eval_batch_size, parts.pad_id)
            infer.append(time.perf_counter() - t0)
    warm = max(1, len(probe.times) // 10)
    return {"method": method, "seed": seed, "lr": lr, "steps": summary["steps"],
            "step_seconds": statistics.median(probe.times[warm:]), "peak_train_mb": probe.peak_mb,
            "inference_seconds": statistics.median(infer), "inference_examples": len(sub),
            "test_examples": len(test), "valid_accuracy": summary["valid"]["accuracy"],
            "test_accuracy": summary["test"]["accuracy"], "trainable_params": summary["trainable_params"],
            "prompt_params": n_prompt}


def _spawn(job: tuple[str, int, float], steps: int, max_per_category: int | None) -> dict:
    method, seed, lr = job
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cap = [] if max_per_category is None else ["--max-per-category", str(max_per_category)]
    out = subprocess.run([sys.executable, "-m", "benchmarks.dept_repro", "--child", method, "--seed", str(seed),
                          "--steps", str(steps), "--lr", repr(lr), *cap], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {method} seed {seed} lr {lr} failed:\n{out.stderr[-3000:]}")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(run), file=sys.stderr, flush=True)  # progress, and the figures survive a crash later on
    return run


def _pool(jobs: list[tuple[str, int, float]], steps: int, max_per_category: int | None, workers: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: _spawn(j, steps, max_per_category), jobs))


def choose_lr(search: list[dict]) -> dict[str, float]:
    """Each method's prompt lr: best validation accuracy among its search runs (ties: the smaller lr)."""
    return {m: min((r for r in search if r["method"] == m), key=lambda r: (-r["valid_accuracy"], r["lr"]))["lr"]
            for m in METHODS}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: list[dict]) -> dict:
    """Mean and spread per method; per-seed savings / accuracy differences, each with its verdict."""
    out: dict = {}
    rows = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
    for method in METHODS:
        out[method] = {k: _stats([r[k] for r in rows[method]]) for k in (*SAVINGS, "valid_accuracy", "test_accuracy")}
        out[method]["prompt_params"] = rows[method][0]["prompt_params"]
        out[method]["trainable_params"] = rows[method][0]["trainable_params"]
    pt, dp = out["prompt_tuning"], out["dept"]
    out["dept_saving"] = {k: 1 - dp[k]["mean"] / pt[k]["mean"] for k in SAVINGS}  # saving of the means
    out["accuracy_delta"] = dp["test_accuracy"]["mean"] - pt["test_accuracy"]["mean"]
    out["claims"] = {k: judge(paired(rows["prompt_tuning"], rows["dept"], k, saving=True), 0.20) for k in SAVINGS}
    out["claims"]["test_accuracy"] = judge(paired(rows["prompt_tuning"], rows["dept"], "test_accuracy", False), 0.0)
    return out


def table(summary: dict, setup: dict) -> str:
    """Markdown table of the summary, per-seed figures and verdicts."""
    pt, dp, sv, cl = summary["prompt_tuning"], summary["dept"], summary["dept_saving"], summary["claims"]
    rows = [f"| | prompt tuning (L={L_PROMPT}, lr {setup['chosen_lr']['prompt_tuning']:g}) "
            f"| DePT (m={M_PROMPT}, r={RANK}, lr {setup['chosen_lr']['dept']:g}) | DePT saving | per-seed | verdict |",
            "|---|---|---|---|---|---|",
            f"| prompt parameters (+ head) | {pt['prompt_params']:,} (+{pt['trainable_params'] - pt['prompt_params']:,}) "
            f"| {dp['prompt_params']:,} (+{dp['trainable_params'] - dp['prompt_params']:,}) | equal | | |"]
    for key, label, fmt in QUANTITIES:
        c = cl[key]
        if key == "test_accuracy":
            mid, per = f"{100 * summary['accuracy_delta']:+.1f} points", " / ".join(f"{100 * v:+.1f}" for v in c["per_seed"])
        else:
            mid, per = f"{100 * sv[key]:.1f}%", " / ".join(f"{100 * v:.0f}%" for v in c["per_seed"])
        rows.append(f"| {label} | {fmt.format(pt[key]['mean'])} ± {fmt.format(pt[key]['std'])} | "
                    f"{fmt.format(dp[key]['mean'])} ± {fmt.format(dp[key]['std'])} | {mid} | {per} | "
                    f"{c['verdict']} (band ±{100 * c['band']:.1f}) |")
    rows.append(f"\n{setup['steps']} optimizer steps of 16, seeds {setup['seeds']}, mean ± std over seeds, 1 CPU thread. "
                f"Prompt lr chosen on validation (seed {SEARCH_SEED}, {setup['search_steps']} steps) from "
                f"{setup['lr_grid']}; validation accuracy per lr: "
                + "; ".join(f"{m}: " + ", ".join(f"{r['lr']:g} → {r['valid_accuracy']:.3f}" for r in setup["search"]
                                                if r["method"] == m) for m in METHODS) + ".")
    return "\n".join(rows)


def plot(payload: dict, path: Path) -> Path:
    """Bars (mean ± std) of the four quantities, per-seed savings and the validation accuracy of the lr search."""
    from .plots import bars, curves, panels, save

    summary, setup = payload["summary"], payload["setup"]
    names = {"prompt_tuning": f"prompt tuning\n(L={L_PROMPT})", "dept": f"DePT\n(m={M_PROMPT}, r={RANK})"}
    fig, axes = panels(len(QUANTITIES) + 2, f"DePT vs prompt tuning at equal prompt parameters, MiniLM + fortunes: "
                                            f"{setup['steps']} steps, seeds {setup['seeds']}, mean ± std", cols=3)
    for ax, (key, label, fmt) in zip(axes, QUANTITIES):
        c = summary["claims"][key]
        note = (f"DePT saves {100 * summary['dept_saving'][key]:.1f}%: {c['verdict']}" if key in SAVINGS
                else f"DePT {100 * summary['accuracy_delta']:+.1f} points: {c['verdict']}")
        bars(ax, [names[m] for m in METHODS], {"": [summary[m][key]["mean"] for m in METHODS]},
             {"": [summary[m][key]["std"] for m in METHODS]}, title=f"{label}\n{note}", ylabel=label,
             value_format=fmt)
    seeds = [str(s) for s in setup["seeds"]]
    bars(axes[4], seeds, {k: [100 * v for v in summary["claims"][k]["per_seed"]] for k in SAVINGS},
         title="DePT saving per seed (%), claim: > 20%", ylabel="saving (%)")
    axes[4].axhline(20, color="k", linestyle="--", linewidth=1)
    axes[4].set_xlabel("seed")
    search = setup["search"]
    curves(axes[5], {m: ([r["lr"] for r in search if r["method"] == m], [r["valid_accuracy"] for r in search
                                                                         if r["method"] == m]) for m in METHODS},
           title=f"lr search: validation accuracy (seed {SEARCH_SEED})", xlabel="prompt lr", ylabel="valid accuracy")
    axes[5].set_xscale("log")
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path | None:
    """Search each method's lr on validation, run every (method, seed) child, write dept_repro.{json,md,png}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--search-steps", type=int, default=None, help="budget of the lr search (default: --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--grid", type=float, nargs="+", default=list(LR_GRID), help="prompt lrs searched")
    parser.add_argument("--max-per-category", type=int, default=None,
                        help="examples per topic (default: the config's 200; smaller only to check the script runs)")
    parser.add_argument("--jobs", type=int, default=1, help="children at a time (at most the free cores)")
    parser.add_argument("--child", choices=sorted(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=LR_GRID[1])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seed, args.steps, args.lr, args.max_per_category)))
        return None
    search_steps = args.search_steps or args.steps
    started = time.perf_counter()
    # methods alternate (and run side by side with --jobs 2) so load drift hits both alike
    search = _pool([(m, SEARCH_SEED, lr) for lr in args.grid for m in METHODS], search_steps,
                   args.max_per_category, args.jobs)
    chosen = choose_lr(search)
    reuse = search_steps == args.steps  # then the search run at the chosen lr *is* the seed-0 run
    runs = [r for r in search if reuse and r["seed"] in args.seeds and r["lr"] == chosen[r["method"]]]
    todo = [(m, s, chosen[m]) for s in args.seeds for m in METHODS if not any(
        r["method"] == m and r["seed"] == s for r in runs)]
    runs = sorted(runs + _pool(todo, args.steps, args.max_per_category, args.jobs), key=lambda r: (r["seed"], r["method"]))
    summary = summarise(runs)
    search_rows = [{k: r[k] for k in ("method", "seed", "lr", "steps", "valid_accuracy")} for r in search]
    payload = {"claim": "DePT: >20% less train/inference time and memory than prompt tuning at equal trainable "
                        "parameters, accuracy at least as good",
               "setup": {"model": "minilm", "data": "examples/fortunes_lora.yaml (8 fortunes topics)",
                         "steps": args.steps, "search_steps": search_steps, "batch_size": 16, "seeds": args.seeds,
                         "threads": 1, "jobs": args.jobs, "max_per_category": args.max_per_category,  # None: config's
                         "methods": METHODS, "lr_grid": args.grid, "search_seed": SEARCH_SEED,
                         "search_metric": "valid_accuracy", "search": search_rows, "chosen_lr": chosen,
                         "seed0_reused_from_search": reuse, "embed_lr": EMBED_LR, "head_lr": HEAD_LR,
                         "malloc_env": MALLOC_ENV, "peak_memory": "VmHWM at the last optimizer step minus VmRSS "
                                                                  "at train begin; no eval pass inside"},
               "runs": runs, "summary": summary, "wall_seconds": time.perf_counter() - started,
               "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dept_repro.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    text = table(summary, payload["setup"])
    (out / "dept_repro.md").write_text(text + "\n")
    plot(payload, out / "dept_repro.png")
    print(text)
    return out / "dept_repro.json"


if __name__ == "__main__":
    main()
