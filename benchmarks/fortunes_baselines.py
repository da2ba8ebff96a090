"""Accuracy of LoRA vs full fine-tuning vs head-only vs TF-IDF + logistic regression on the default fortunes task.

All four use the split of examples/fortunes_lora.yaml (same categories, caps, seed). The
three MiniLM runs go through `unipeft.train.train_run` with the shipped config plus
overrides, in this one process, so their times are side by side under the same load.

    python -m benchmarks.fortunes_baselines [--only lora,full,head,tfidf] [--threads N] [--out PATH]

Writes benchmarks/results/fortunes_baselines.json (or --out) and a PNG beside it, and prints a
markdown table. --max-steps and --max-per-category shrink the budget, only to check the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
OUT = ROOT / "benchmarks" / "results" / "fortunes_baselines.json"

# Overrides of the shipped LoRA config for the other two MiniLM baselines. Full fine-tuning keeps the
# config's classifier group (new head at 3e-3, the pretrained body at 5e-5). Head only drops that
# group; its lr was picked on the valid split among 3e-3 (valid 0.593), 3e-2 (0.775) and 1e-1 (0.780).
VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "full": ["--method", "{name: full}", "--optimizer.lr", "5e-5"],
    "head": ["--method", "{name: full, trainable: ['^classifier\\.']}", "--optimizer.lr", "1e-1",
             "--optimizer.groups", "[]"],
}


def budget_overrides(max_steps: int | None = None, max_per_category: int | None = None) -> list[str]:
    """Config overrides of a smaller budget (none by default: the shipped config's 3 epochs, 200 per topic)."""
    out = [] if max_steps is None else ["--max_steps", str(max_steps)]
    return out + ([] if max_per_category is None else ["--data.max_per_category", str(max_per_category)])


def run_minilm(name: str, threads: int | None, workdir: Path, budget: list[str] | None = None) -> dict:
    """Train one MiniLM variant and return its test metrics and timing."""
    from unipeft.train import load_config, train_run

    overrides = VARIANTS[name] + (budget or []) + ["--output_dir", str(workdir / name)]
    if threads is not None:
        overrides += ["--threads", str(threads)]
    cfg = load_config(CONFIG, overrides)
    start = time.perf_counter()
    summary = train_run(cfg, show_progress=False, log=lambda *_: None)
    wall = time.perf_counter() - start
    return {"accuracy": summary["test"]["accuracy"], "macro_f1": summary["test"]["macro_f1"],
            "valid_accuracy": summary["valid"].get("accuracy"), "trainable_params": summary["trainable_params"],
            "train_seconds": round(summary["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "steps": summary["steps"], "overrides": VARIANTS[name]}


def run_tfidf(budget: list[str] | None = None) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression on the same train/test split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from unipeft.data.sources import load_data
    from unipeft.train import load_config

    cfg = load_config(CONFIG, budget or [])  # the same data caps as the MiniLM rows
    splits = load_data(cfg.task, cfg.data, cfg.data_seed)
    start = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
    x_train = vec.fit_transform(splits.train.texts)
    clf = LogisticRegression(C=10.0, max_iter=3000).fit(x_train, splits.train.labels)
    pred = clf.predict(vec.transform(splits.test.texts))
    acc = float((pred == splits.test.labels).mean())
    f1 = float(f1_score(splits.test.labels, pred, average="macro"))
    return {"accuracy": acc, "macro_f1": f1, "train_seconds": round(time.perf_counter() - start, 1),
            "examples": splits.sizes()}


def metadata(threads: int) -> dict:
    """Library versions, machine, seed and thread count of the figures."""
    import platform

    import accelerate
    import sklearn
    import torch
    import transformers

    from unipeft.train import load_config
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "seed": load_config(CONFIG).seed, "config": str(CONFIG.relative_to(ROOT)),
            "date": time.strftime("%Y-%m-%d")}


NAMES = {"lora": "LoRA r=8 (shipped config)", "full": "full fine-tuning", "head": "head only",
         "tfidf": "TF-IDF + logistic regression"}


def table(runs: dict) -> str:
    """The markdown table of the README section."""
    rows = ["| method | trainable params | test accuracy | macro-F1 | train time (s) |", "|---|---:|---:|---:|---:|"]
    for key, label in NAMES.items():
        if key in runs:
            r = runs[key]
            params = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
            rows.append(f"| {label} | {params} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['train_seconds']} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> Path:
    """Bars per baseline: test accuracy, macro-F1, train time and trainable parameters, to a PNG."""
    from .plots import bars, panels, save

    runs = results["runs"]
    keys = [k for k in NAMES if k in runs]
    labels = [NAMES[k].replace(" (", "\n(").replace(" + ", " +\n") for k in keys]
    fig, axes = panels(4, f"Fortunes topic classification ({results.get('config', '')}): one run each, "
                          f"{results.get('torch_threads', 1)} torch thread(s)")
    bars(axes[0], labels, {"": [runs[k]["accuracy"] for k in keys]}, title="test accuracy", ylabel="accuracy",
         value_format="{:.3f}")
    bars(axes[1], labels, {"": [runs[k]["macro_f1"] for k in keys]}, title="test macro-F1", ylabel="macro-F1",
         value_format="{:.3f}")
    bars(axes[2], labels, {"": [runs[k]["train_seconds"] for k in keys]}, title="train time", ylabel="s",
         value_format="{:.1f}")
    bars(axes[3], labels, {"": [runs[k].get("trainable_params") for k in keys]},
         title="trainable parameters (TF-IDF: not a network)", ylabel="parameters (log scale)",
         value_format="{:,.0f}")
    axes[3].set_yscale("log")
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Run the chosen baselines (one process, one after the other) and write the JSON + markdown table + PNG."""
    from .plots import png_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tfidf,head,lora,full",
                        help="comma-separated subset; results of other rows already in the JSON are kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--out", type=Path, default=OUT, help="the result JSON (default benchmarks/results/"
                                                                "fortunes_baselines.json); the PNG goes beside it")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the config's 3 epochs)")
    parser.add_argument("--max-per-category", type=int, default=None,
                        help="examples per topic (default: the config's 200)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    out = args.out
    budget = budget_overrides(args.max_steps, args.max_per_category)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", {})
    results.update(metadata(args.threads))
    workdir = Path(tempfile.mkdtemp(prefix="fortunes-bench-"))
    try:
        for name in args.only.split(","):
            load_before = os.getloadavg()[0]
            row = run_tfidf(budget) if name == "tfidf" else run_minilm(name, args.threads, workdir, budget)
            if args.max_per_category is not None:
                row["max_per_category"] = args.max_per_category
            row["load_avg_1min_before"] = round(load_before, 2)
            row["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
            row["threads"] = args.threads
            row["measured"] = time.strftime("%Y-%m-%d %H:%M")
            results["runs"][name] = row
            print(name, json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    runs = results["runs"]
    if "lora" in runs and "full" in runs:
        results["lora_over_full"] = runs["lora"]["accuracy"] / runs["full"]["accuracy"]
        results["lora_reaches_95pct_of_full"] = results["lora_over_full"] >= 0.95
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path(out))
    print()
    print(table(runs))
    if "lora_over_full" in results:
        print(f"\nLoRA / full fine-tuning accuracy: {results['lora_over_full']:.3f} (claim: >= 0.95)")
    return out


if __name__ == "__main__":
    main()
