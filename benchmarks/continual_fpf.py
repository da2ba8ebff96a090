"""Reproduce FPF / k-FPF on the offline benchmarks: every method side by side, 3 seeds, JSON + markdown.

    python -m benchmarks.continual_fpf                       # both benchmarks, seeds 0 1 2
    python -m benchmarks.continual_fpf --benchmark seq-digits --seeds 0
    python -m benchmarks.continual_fpf --benchmark seq-digits --seeds 0 --epochs 1 --fpf-steps 5 --out /tmp/c.json

Writes the JSON (default benchmarks/results/continual_fpf.json) and a PNG beside it. --epochs,
--fpf-steps and --kfpf-steps shrink the presets' budget, only to check that the script runs.

Claims checked (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023):
FPF at the end improves ER and DER++; k-FPF (no replay during training, FPF k times) is
comparable to FPF at a fraction of their compute. Ablations on Seq-Digits: k-FPF at FPF's
budget, and fine-tuning *all* modules on the buffer at the end instead of the selected ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")


def _versions() -> dict:
    import sklearn
    import transformers

    import unipeft
    return {"unipeft": unipeft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _add_variant(payload: dict, variant: dict, method: str, label: str) -> None:
    """Put `method` of an ablation run into `payload` as row `label`, compute relative to payload's ER."""
    from unipeft.continual.suites import compute_ratios, summarize

    rows = [{**row, "method": label, "vs_er": compute_ratios(row["compute"], er["compute"])}
            for er, row in zip(payload["per_seed"]["er"], variant["per_seed"][method])]
    payload["per_seed"][label] = rows
    payload["summary"][label] = summarize(rows)
    payload["methods"].append(label)
    payload.setdefault("ablation_configs", {})[label] = variant["config"]


def _paired(payload: dict, a: str, b: str) -> dict:
    """Per-seed difference of final average accuracy a - b (same seed = same data order and init)."""
    d = [x["final_average_accuracy"] - y["final_average_accuracy"]
         for x, y in zip(payload["per_seed"][a], payload["per_seed"][b])]
    return {"per_seed": d, "mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0,
            "all_positive": all(v > 0 for v in d)}


def _ratio(payload: dict, a: str, b: str, key: str) -> float:
    """Mean over seeds of compute[key] of a / of b."""
    return statistics.fmean(x["compute"][key] / y["compute"][key]
                            for x, y in zip(payload["per_seed"][a], payload["per_seed"][b]))


def claims(payload: dict) -> dict:
    """The paper's claims as numbers on this benchmark."""
    s = payload["summary"]
    out = {"fpf_improves_er": _paired(payload, "er+fpf", "er"),
           "fpf_improves_derpp": _paired(payload, "derpp+fpf", "derpp")}
    for k in ("kfpf", "kfpf-kd"):
        for ref in ("er+fpf", "derpp+fpf"):
            out[f"{k}_vs_{ref}"] = {
                "accuracy_gap": s[k]["final_average_accuracy"]["mean"] - s[ref]["final_average_accuracy"]["mean"],
                "batch_steps_ratio": _ratio(payload, k, ref, "batch_steps"),
                "flops_ratio": _ratio(payload, k, ref, "flops"),
                "cpu_time_ratio": _ratio(payload, k, ref, "train_cpu_seconds")}
    return out


def budgeted(preset, epochs: int | None = None, fpf_steps: int | None = None, kfpf_steps: int | None = None):
    """The preset CLConfig with a smaller training budget where given (None keeps the preset's value)."""
    cfg = preset
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if fpf_steps is not None:
        cfg = dataclasses.replace(cfg, fpf=dataclasses.replace(cfg.fpf, steps=fpf_steps))
    if kfpf_steps is not None:
        cfg = dataclasses.replace(cfg, kfpf_steps=kfpf_steps)
    return cfg


def run(name: str, seeds: list[int], **budget: int | None) -> dict:
    """All methods of one benchmark side by side (plus the Seq-Digits ablations); `budget` as for budgeted()."""
    from unipeft.continual import DEFAULT_METHODS, get_benchmark, run_benchmark

    t0 = time.perf_counter()
    cfg = budgeted(get_benchmark(name).preset(), **budget)
    payload = run_benchmark(name, list(DEFAULT_METHODS), seeds, config=dataclasses.replace(cfg), progress=False,
                            warmup=True)
    if name == "seq-digits":
        low = dataclasses.replace(cfg, kfpf_budget=cfg.fpf.budget)
        ablation = run_benchmark(name, ["kfpf"], seeds, config=low, progress=False, warmup=True)
        _add_variant(payload, ablation, "kfpf", f"kfpf, budget {cfg.fpf.budget} (ablation)")
        every = dataclasses.replace(cfg, fpf=dataclasses.replace(cfg.fpf, budget=1.0))
        ablation = run_benchmark(name, ["er+fpf"], seeds, config=every, progress=False, warmup=True)
        _add_variant(payload, ablation, "er+fpf", "er + fine-tune all modules (ablation)")
    payload["claims"] = claims(payload)
    payload["benchmark_seconds"] = time.perf_counter() - t0
    return payload


def _seen_average(payload: dict, method: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of the average accuracy on the tasks seen so far, after each task (1-based)."""
    matrices = [row["accuracy_matrix"] for row in payload["per_seed"][method]]
    first = len(payload["task_names"]) - len(matrices[0]) + 1  # joint training: one row, after the last task
    curve = [statistics.fmean(statistics.fmean(m[i]) for m in matrices) for i in range(len(matrices[0]))]
    return list(range(first, first + len(curve))), curve


def plot(result: dict, path: Path) -> Path:
    """One row per benchmark: accuracy, forgetting and FLOPs vs ER (mean ± std over seeds), accuracy curves."""
    from .plots import bars, curves, panels, save

    benches = result["benchmarks"]
    fig, axes = panels(4 * len(benches), f"FPF / k-FPF reproduction, class-IL, seeds {result['seeds']}: "
                                         f"mean ± std over seeds", cols=4, size=(5.5, 4.2))
    for row, (name, payload) in enumerate(benches.items()):
        ax = axes[4 * row: 4 * row + 4]
        methods, summary = payload["methods"], payload["summary"]
        for a, (key, label) in zip(ax, (("final_average_accuracy", "final average accuracy"),
                                        ("average_forgetting", "average forgetting"))):
            bars(a, methods, {"": [summary[m][key]["mean"] for m in methods]},
                 {"": [summary[m][key]["std"] for m in methods]}, f"{name}: {label}", label, "{:.3f}", rotate=True)
        bars(ax[2], methods, {"": [summary[m]["flops_vs_er"]["mean"] for m in methods]},
             title=f"{name}: training FLOPs relative to ER", ylabel="x ER", value_format="{:.2f}", rotate=True)
        curves(ax[3], {m: _seen_average(payload, m) for m in methods}, f"{name}: accuracy on the tasks seen so far",
               "after task", "average accuracy")
        ax[3].legend(fontsize="xx-small", ncols=2)
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmarks, write the JSON (default benchmarks/results/continual_fpf.json) + PNG, print the tables."""
    from unipeft.continual import markdown_table

    from .plots import png_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", nargs="+", default=["seq-digits", "seq-fortunes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS / "continual_fpf.json")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the preset's)")
    parser.add_argument("--fpf-steps", type=int, default=None, help="steps of the final FPF (default: the preset's)")
    parser.add_argument("--kfpf-steps", type=int, default=None, help="steps per k-FPF phase (default: the preset's)")
    args = parser.parse_args(argv)
    budget = {"epochs": args.epochs, "fpf_steps": args.fpf_steps, "kfpf_steps": args.kfpf_steps}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more threads
    result = {"versions": _versions(), "seeds": args.seeds, "benchmarks": {}}
    for name in args.benchmark:
        result["benchmarks"][name] = run(name, args.seeds, **budget)
        print("\n" + markdown_table(result["benchmarks"][name]) + "\n", flush=True)
        print(json.dumps(result["benchmarks"][name]["claims"], indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each benchmark: nothing is lost
        plot(result, png_path(args.out))
    print(f"wrote {args.out} and {png_path(args.out)}")
    return args.out


if __name__ == "__main__":
    main()
