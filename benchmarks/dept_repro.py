"""DePT vs prompt tuning at equal trainable parameter count, on MiniLM + the 8-topic fortunes task.

DePT's claim (Shi & Lipani, ICLR 2024): replacing a prompt of L tokens by a shorter prompt of m
tokens plus a rank-r update of the input embeddings, at the same parameter count, saves over
20% of training/inference time and memory with accuracy at least as good. Here: L=100 vs m=60,
r=30 (the paper's setting; with d=384 and max_length=128 both have 38,400 prompt parameters),
the data config of examples/fortunes_lora.yaml, one CPU thread, the same reduced step budget
for both, 3 seeds. Each (method, seed) trains in its own child process, which reports the
median optimizer-step time, the training peak memory (VmHWM over the run minus the resident
size when training starts), the test-set inference time and the test accuracy.

    python -m benchmarks.dept_repro [--steps 120] [--seeds 0 1 2] [--max-per-category N] [--out DIR]

Writes dept_repro.json, dept_repro.md and dept_repro.png (bars, mean ± std over seeds) into --out.
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
from pathlib import Path

from .common import RESULTS, versions
from .memprobe import peak_mb_since, reset_peak

ROOT = Path(__file__).resolve().parent.parent
L_PROMPT, M_PROMPT, RANK, MAX_LENGTH = 100, 60, 30, 128
METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": L_PROMPT, "init": "vocab"},
    "dept": {"name": "dept", "num_virtual_tokens": M_PROMPT, "rank": RANK, "max_length": MAX_LENGTH,
             "lr_embedding_update": 1e-3, "init": "vocab"},
}
PROMPT_LR, HEAD_LR = 3e-2, 3e-2


def run_config(method: str, seed: int, steps: int, out: str, max_per_category: int | None = None):
    """examples/fortunes_lora.yaml with the method swapped in, a fixed step budget and one thread."""
    import yaml

    from unipeft.train.config import config_from_dict

    data = yaml.safe_load((ROOT / "examples" / "fortunes_lora.yaml").read_text())
    data.update(method=dict(METHODS[method]), max_steps=steps, seed=seed, threads=1, output_dir=out,
                log_every=10_000, eval_every=10_000)
    if max_per_category is not None:  # fewer examples per topic: the smoke test's budget
        data["data"]["max_per_category"] = max_per_category
    data["optimizer"] = {"lr": PROMPT_LR, "weight_decay": 0.0, "groups": [{"params": "classifier", "lr": HEAD_LR}]}
    data["schedule"] = {"name": "linear", "warmup_ratio": 0.1}
    return config_from_dict(data)


def child(method: str, seed: int, steps: int, max_per_category: int | None = None) -> dict:
    """Train one (method, seed) and measure it; runs in a fresh process."""
    import torch

    from unipeft.train.callbacks import TrainerCallback
    from unipeft.train.evaluate import predict_rows
    from unipeft.train.run import train_run
    from unipeft.train.setup import build_parts

    torch.set_num_threads(1)

    class Probe(TrainerCallback):
        """Per-step wall times and the memory high-water mark of training."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.model = None

        def on_train_begin(self, ctx) -> None:
            self.rss0 = reset_peak()

        def on_step_begin(self, ctx) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, ctx) -> None:
            self.times.append(time.perf_counter() - self.t0)

        def on_train_end(self, ctx) -> None:
            self.peak_mb = peak_mb_since(self.rss0)
            self.model = ctx.model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(method, seed, steps, str(Path(tmp) / "run"), max_per_category)
        probe = Probe()
        summary = train_run(cfg, show_progress=False, callbacks=[probe], log=lambda *a: None)
        parts = build_parts(cfg)
        test = parts.encode("test")
        model = probe.model
        n_prompt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
        k = min(64, len(test))  # one eval batch: the timing, not the accuracy, needs it
        sub = type(test)(test.rows[:k], test.weights[:k], test.lengths[:k])
        t0 = time.perf_counter()  # warm already: train_run just evaluated the test set
        predict_rows(model, sub, "classification", cfg.eval_batch_size, parts.pad_id)
        infer = time.perf_counter() - t0
    warm = max(1, len(probe.times) // 10)
    return {"method": method, "seed": seed, "steps": summary["steps"],
            "step_seconds": statistics.median(probe.times[warm:]), "peak_train_mb": round(probe.peak_mb, 1),
            "inference_seconds": infer, "inference_examples": len(sub), "test_examples": len(test),
            "test_accuracy": summary["test"]["accuracy"], "trainable_params": summary["trainable_params"],
            "prompt_params": n_prompt}


def _spawn(method: str, seed: int, steps: int, max_per_category: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cap = [] if max_per_category is None else ["--max-per-category", str(max_per_category)]
    out = subprocess.run([sys.executable, "-m", "benchmarks.dept_repro", "--child", method, "--seed", str(seed),
                          "--steps", str(steps), *cap], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {method} seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: list[dict]) -> dict:
    """Mean and spread per method, and DePT's relative savings."""
    out: dict = {}
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        out[method] = {k: _stats([r[k] for r in rows])
                       for k in ("step_seconds", "peak_train_mb", "inference_seconds", "test_accuracy")}
        out[method]["prompt_params"] = rows[0]["prompt_params"]
        out[method]["trainable_params"] = rows[0]["trainable_params"]
    pt, dp = out["prompt_tuning"], out["dept"]
    out["dept_saving"] = {k: 1 - dp[k]["mean"] / pt[k]["mean"]
                          for k in ("step_seconds", "peak_train_mb", "inference_seconds")}
    out["accuracy_delta"] = dp["test_accuracy"]["mean"] - pt["test_accuracy"]["mean"]
    return out


def table(summary: dict, steps: int, seeds: list[int]) -> str:
    """Markdown table of the summary."""
    rows = [f"| | prompt tuning (L={L_PROMPT}) | DePT (m={M_PROMPT}, r={RANK}) | DePT saving |", "|---|---|---|---|"]
    pt, dp, sv = summary["prompt_tuning"], summary["dept"], summary["dept_saving"]
    rows.append(f"| prompt parameters (+ head) | {pt['prompt_params']:,} (+{pt['trainable_params'] - pt['prompt_params']:,}) "
                f"| {dp['prompt_params']:,} (+{dp['trainable_params'] - dp['prompt_params']:,}) | equal |")
    for key, label, fmt in (("step_seconds", "train step (s, median)", "{:.3f}"),
                            ("peak_train_mb", "training peak memory (MB)", "{:.0f}"),
                            ("inference_seconds", "inference, 64 test examples (s)", "{:.2f}")):
        rows.append(f"| {label} | {fmt.format(pt[key]['mean'])} ± {fmt.format(pt[key]['std'])} | "
                    f"{fmt.format(dp[key]['mean'])} ± {fmt.format(dp[key]['std'])} | {100 * sv[key]:.1f}% |")
    rows.append(f"| test accuracy | {pt['test_accuracy']['mean']:.3f} ± {pt['test_accuracy']['std']:.3f} | "
                f"{dp['test_accuracy']['mean']:.3f} ± {dp['test_accuracy']['std']:.3f} | "
                f"{100 * summary['accuracy_delta']:+.1f} points |")
    rows.append(f"\n{steps} optimizer steps of 16, seeds {seeds}, mean ± std over seeds, 1 CPU thread.")
    return "\n".join(rows)


QUANTITIES = (("step_seconds", "train step (s, median)", "{:.3f}"),
              ("peak_train_mb", "training peak memory (MB)", "{:.0f}"),
              ("inference_seconds", "inference, {n} test examples (s)", "{:.2f}"),
              ("test_accuracy", "test accuracy", "{:.3f}"))


def plot(payload: dict, path: Path) -> Path:
    """Bars (mean ± std over seeds) of the four measured quantities, prompt tuning beside DePT, to a PNG."""
    from .plots import bars, panels, save

    summary, setup = payload["summary"], payload["setup"]
    names = {"prompt_tuning": f"prompt tuning\n(L={L_PROMPT})", "dept": f"DePT\n(m={M_PROMPT}, r={RANK})"}
    fig, axes = panels(len(QUANTITIES), f"DePT vs prompt tuning at equal prompt parameters, MiniLM + fortunes: "
                                        f"{setup['steps']} steps, seeds {setup['seeds']}, mean ± std")
    n_infer = payload["runs"][0]["inference_examples"]
    for ax, (key, label, fmt) in zip(axes, QUANTITIES):
        label = label.format(n=n_infer)
        saving = summary["dept_saving"].get(key)
        note = (f"DePT saves {100 * saving:.1f}%" if saving is not None
                else f"DePT {100 * summary['accuracy_delta']:+.1f} points")
        bars(ax, [names[m] for m in METHODS], {"": [summary[m][key]["mean"] for m in METHODS]},
             {"": [summary[m][key]["std"] for m in METHODS]}, title=f"{label}\n{note}", ylabel=label,
             value_format=fmt)
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path | None:
    """Run every (method, seed) child, interleaved, and write dept_repro.{json,md,png} into --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-per-category", type=int, default=None,
                        help="examples per topic (default: the config's 200; smaller only to check the script runs)")
    parser.add_argument("--child", choices=sorted(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seed, args.steps, args.max_per_category)))
        return None
    from tqdm import tqdm

    jobs = [(m, s) for s in args.seeds for m in METHODS]  # alternate methods so load drift hits both
    runs = []
    started = time.perf_counter()
    for method, seed in tqdm(jobs, desc="dept_repro", unit="run"):
        runs.append(_spawn(method, seed, args.steps, args.max_per_category))
    summary = summarise(runs)
    payload = {"claim": "DePT: >20% less train/inference time and memory than prompt tuning at equal trainable "
                        "parameters, accuracy at least as good",
               "setup": {"model": "minilm", "data": "examples/fortunes_lora.yaml (8 fortunes topics)",
                         "steps": args.steps, "batch_size": 16, "seeds": args.seeds, "threads": 1,
                         "max_per_category": args.max_per_category,  # None: the config's
                         "methods": METHODS, "prompt_lr": PROMPT_LR, "head_lr": HEAD_LR},
               "runs": runs, "summary": summary, "wall_seconds": time.perf_counter() - started,
               "versions": versions()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dept_repro.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    text = table(summary, args.steps, args.seeds)
    (out / "dept_repro.md").write_text(text + "\n")
    plot(payload, out / "dept_repro.png")
    print(text)
    return out / "dept_repro.json"


if __name__ == "__main__":
    main()
