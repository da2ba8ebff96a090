"""Reproduce FPF / k-FPF on the offline benchmarks: validation-tuned, 10 seeds, verdicts, JSON + PNG + README.

    python -m benchmarks.continual_fpf                                   # both benchmarks, seeds 0-9
    python -m benchmarks.continual_fpf --benchmark seq-fortunes --seeds 3 --raw-out /tmp/f3.json  # one seed shard
    python -m benchmarks.continual_fpf --from-raw /tmp/*.json            # select, judge and write from the shards
    python -m benchmarks.continual_fpf --benchmark seq-digits --out /tmp/d.json
    python -m benchmarks.continual_fpf --merge /tmp/d.json /tmp/f.json   # one JSON + PNG from per-benchmark runs
    python -m benchmarks.continual_fpf --no-run --readme README.md       # regenerate the README results from the JSON
    python -m benchmarks.continual_fpf --benchmark seq-digits --seeds 0 --epochs 1 --fpf-steps 5 --out /tmp/c.json

Writes the JSON (default benchmarks/results/continual_fpf.json) and a PNG beside it. --epochs,
--fpf-steps and --kfpf-steps shrink the presets' budget, only to check that the script runs.

Protocol. Each task's training data loses VALID_FRACTION of every class (seeded, VALID_SEED) to a
validation split; every method trains on the rest. The hyper-parameters in which the compared
methods differ are chosen per benchmark on validation: FPF's parameter budget (FPF_BUDGETS, for
ER+FPF and DER++ +FPF separately; one training run, FPF branched at every budget) and k-FPF's budget
and number k of FPF phases (GRIDS, for k-FPF and k-FPF-KD separately): the grid point with the best
validation final average accuracy, averaged over the seeds (ties: the first in grid order). Test
accuracies of the other grid points are neither used nor stored. Everything else (epochs, lr, FPF's
steps and lr, k-FPF's steps per phase, DER++'s alpha/beta, buffer) is the preset's and the same for
every method that has it.

Claims checked (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023),
each from per-seed paired differences (same seed = same initialisation, data order and buffer draws):
FPF at the end improves ER and DER++; k-FPF (no replay during training, FPF k times) is comparable
to FPF (within COMPARABLE_MARGIN) at less compute; on Seq-Digits, FPF on the selected modules beats
fine-tuning all modules on the buffer. Verdict rules: VERDICT_RULES.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from .dept_verdict import BAND_SE, FAILS, HOLDS, MEAN_ONLY, NOISE, band

RESULTS = Path(__file__).with_name("results")
SEEDS = tuple(range(10))  # a seed shard takes ~15 s (digits) / ~2.5 min (fortunes) here, so ten seeds
VALID_FRACTION = 0.2
VALID_SEED = 0
# Declared before the runs; k's values are the number of tasks and about half of it.
GRIDS = {"seq-digits": {"kfpf_budget": (0.1, 0.25, 0.5), "kfpf_k": (3, 5)},
         "seq-fortunes": {"kfpf_budget": (0.1, 0.25, 0.5), "kfpf_k": (2, 4)}}
FPF_BUDGETS = (0.1, 0.25, 0.5)  # FPF's own parameter budget, chosen the same way for ER+FPF and DER++ +FPF
MAIN_METHODS = ("sgd", "er", "er+fpf", "derpp", "derpp+fpf", "joint")
FPF_METHODS = ("er+fpf", "derpp+fpf")
KFPF_METHODS = ("kfpf", "kfpf-kd")
ALL_MODULES = "er + fine-tune all modules (ablation)"
COMPARABLE_MARGIN = 0.02  # "comparable": at most 2 accuracy points below, on the per-seed differences
VERDICT_RULES = {
    "d_s": "per-seed paired difference of the claim's figure (test final average accuracy A - B, or the compute "
           "saving 1 - A/B), minus the claim's threshold",
    "band": f"{BAND_SE:g} standard errors of the mean of d_s: {BAND_SE:g} * stdev(d) / sqrt(n seeds); 0 with one seed",
    "verdict": f"'{NOISE}' if |mean d| <= band; else '{FAILS}' if mean d < 0; else '{HOLDS}' if d_s > 0 on every "
               f"seed, '{MEAN_ONLY}' otherwise",
    "thresholds": f"'improves' / 'beats' / 'cheaper': 0; 'comparable': -{COMPARABLE_MARGIN:g} (at most "
                  f"{100 * COMPARABLE_MARGIN:g} points below)",
}


def verdict(d: list[float]) -> str:
    """The only place verdict strings are made: VERDICT_RULES on threshold-shifted per-seed differences d."""
    mean, half = statistics.fmean(d), band(d)
    if abs(mean) <= half:
        return NOISE
    if mean < 0:
        return FAILS
    return HOLDS if all(x > 0 for x in d) else MEAN_ONLY


def _versions() -> dict:
    import sklearn
    import transformers

    import unipeft
    return {"unipeft": unipeft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _add_method(payload: dict, variant: dict, method: str, label: str, config: dict) -> None:
    """Put `method` of another run_benchmark payload into `payload` as row `label`, compute relative to its ER."""
    from unipeft.continual.suites import compute_ratios, summarize

    rows = [{**row, "method": label, "vs_er": compute_ratios(row["compute"], er["compute"])}
            for er, row in zip(payload["per_seed"]["er"], variant["per_seed"][method])]
    payload["per_seed"][label] = rows
    payload["summary"][label] = summarize(rows)
    payload["methods"].append(label)
    payload.setdefault("method_configs", {})[label] = config


def _claim(statement: str, kind: str, a: str, b: str, per_seed: list[float], threshold: float, unit: str) -> dict:
    d = [x - threshold for x in per_seed]
    return {"statement": statement, "kind": kind, "a": a, "b": b, "unit": unit, "threshold": threshold,
            "per_seed": per_seed, "mean": statistics.fmean(per_seed), "band": band(d), "verdict": verdict(d)}


def _accs(payload: dict, m: str) -> list[float]:
    return [r["final_average_accuracy"] for r in payload["per_seed"][m]]


def claims(payload: dict) -> dict:
    """The paper's claims as per-seed paired differences and verdicts on this benchmark."""
    def acc_diff(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(_accs(payload, a), _accs(payload, b))]

    def saving(a: str, b: str, key: str) -> list[float]:
        return [1 - x["compute"][key] / y["compute"][key]
                for x, y in zip(payload["per_seed"][a], payload["per_seed"][b])]

    out = {"fpf_improves_er": _claim("FPF at the end improves ER", "improves", "er+fpf", "er",
                                     acc_diff("er+fpf", "er"), 0.0, "accuracy"),
           "fpf_improves_derpp": _claim("FPF at the end improves DER++", "improves", "derpp+fpf", "derpp",
                                        acc_diff("derpp+fpf", "derpp"), 0.0, "accuracy")}
    for k in KFPF_METHODS:
        for ref in ("er+fpf", "derpp+fpf"):
            out[f"{k}_comparable_to_{ref}"] = _claim(
                f"{k} is comparable to {ref} (at most {100 * COMPARABLE_MARGIN:g} points below)", "comparable", k, ref,
                acc_diff(k, ref), -COMPARABLE_MARGIN, "accuracy")
            out[f"{k}_fewer_flops_than_{ref}"] = _claim(f"{k} trains with fewer FLOPs than {ref}", "cheaper", k, ref,
                                                        saving(k, ref, "flops"), 0.0, "FLOPs saving")
    if ALL_MODULES in payload["per_seed"]:
        out["fpf_beats_finetune_all"] = _claim("FPF (selected modules) beats fine-tuning all modules on the buffer",
                                               "beats", "er+fpf", ALL_MODULES, acc_diff("er+fpf", ALL_MODULES), 0.0,
                                               "accuracy")
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


def grid_points(grid: dict[str, tuple]) -> list[dict]:
    """Every combination of the grid's values, in grid order (the first key varies slowest)."""
    points = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def choose(scores: list[dict]) -> int:
    """Index of the grid point with the best mean validation score (first on ties)."""
    best = max(s["valid_mean"] for s in scores)
    return next(i for i, s in enumerate(scores) if s["valid_mean"] == best)


def _stream_sizes(stream) -> dict:
    return {"train_per_task": [len(t.train) for t in stream], "valid_per_task": [len(t.valid) for t in stream],
            "test_per_task": [len(t.test) for t in stream]}


def collect(name: str, seeds: list[int], log=print, **budget: int | None) -> dict:
    """Every run of one benchmark on the validation protocol (all grid points); `budget` as for budgeted().

    The raw form keeps every grid point's run_benchmark payload; finish() selects on validation and
    drops the unchosen points. Raw results of disjoint seed sets can be joined with merge_raw().
    """
    from unipeft.continual import get_benchmark, run_benchmark

    t0 = time.perf_counter()
    bench = get_benchmark(name)
    cfg = budgeted(bench.preset(), **budget)
    cfg.progress = False
    stream = bench.stream("class-il").with_validation(VALID_FRACTION, VALID_SEED)
    if cfg.fpf.budget not in FPF_BUDGETS:
        raise ValueError(f"{name}: the preset's FPF budget {cfg.fpf.budget} is not in FPF_BUDGETS {FPF_BUDGETS}")
    # One training run per method and seed; FPF at the end branches from it at every budget (and at 1.0: all modules).
    variants = tuple(b for b in FPF_BUDGETS if b != cfg.fpf.budget) + (1.0,)
    main = run_benchmark(name, list(MAIN_METHODS), seeds, config=dataclasses.replace(cfg, fpf_variants=variants),
                         progress=False, warmup=True, stream=stream, log=log)
    params = sum(p.numel() for p in bench.model(seeds[0], stream).parameters() if p.requires_grad)
    grid = [run_benchmark(name, list(KFPF_METHODS), seeds, config=dataclasses.replace(cfg, **point),
                          progress=False, stream=stream, log=log) for point in grid_points(GRIDS[name])]
    steps_per_task = [-(-len(t.train) // cfg.batch_size) for t in stream]
    return {"name": name, "main": main, "grid": grid, "trainable_parameters": params,
            "validation": {"fraction": VALID_FRACTION, "seed": VALID_SEED,
                           "how": "per task and class, round(fraction * n) training examples held out "
                                  "(TaskStream.with_validation); every method trains on the rest",
                           **_stream_sizes(stream)},
            "budget": {"epochs_per_task": cfg.epochs, "batch_size": cfg.batch_size,
                       "train_steps_per_task": [cfg.epochs * n for n in steps_per_task],
                       "fpf_steps": cfg.fpf.steps, "kfpf_steps_per_phase": cfg.kfpf_steps or cfg.fpf.steps,
                       "buffer_size": cfg.buffer_size, "lr": cfg.lr, "fpf_lr": cfg.fpf.lr},
            "seconds": {",".join(map(str, seeds)): time.perf_counter() - t0}}


def _join(payloads: list[dict]) -> dict:
    """run_benchmark payloads of disjoint seed sets (same config) as one, seeds in order."""
    from unipeft.continual.suites import summarize

    first = payloads[0]
    if any(p["config"] != first["config"] for p in payloads):
        raise ValueError(f"{first['benchmark']}: the parts to merge have different configs")
    order = sorted((s, i, j) for i, p in enumerate(payloads) for j, s in enumerate(p["seeds"]))
    if len({s for s, _, _ in order}) != len(order):
        raise ValueError(f"{first['benchmark']}: a seed occurs in two parts")
    per_seed = {m: [payloads[i]["per_seed"][m][j] for _, i, j in order] for m in first["methods"]}
    return {**first, "seeds": [s for s, _, _ in order], "per_seed": per_seed,
            "summary": {m: summarize(rows) for m, rows in per_seed.items()}}


def merge_raw(parts: list[dict]) -> dict:
    """collect() results of one benchmark over disjoint seed sets, as one."""
    first = parts[0]
    return {**first, "main": _join([p["main"] for p in parts]),
            "grid": [_join([p["grid"][i] for p in parts]) for i in range(len(first["grid"]))],
            "seconds": {k: v for p in parts for k, v in p["seconds"].items()}}


def finish(raw: dict) -> dict:
    """Choose k-FPF's grid point on validation, add the chosen rows to the main payload, compute the claims."""
    from unipeft.continual.suites import summarize, variant_name

    name, payload = raw["name"], json.loads(json.dumps(raw["main"]))
    preset = payload["config"]["fpf"]["budget"]
    selection = {}
    all_modules = {m: payload["per_seed"].pop(variant_name(m, 1.0)) for m in FPF_METHODS}
    for m in FPF_METHODS:
        rows = {b: payload["per_seed"][m] if b == preset else payload["per_seed"].pop(variant_name(m, b))
                for b in FPF_BUDGETS}
        scores = [{"fpf_budget": b, "valid_per_seed": [r["valid_final_average_accuracy"] for r in rows[b]]}
                  for b in FPF_BUDGETS]
        for sc in scores:
            sc["valid_mean"] = statistics.fmean(sc["valid_per_seed"])
        i = choose(scores)
        selection[m] = {"chosen": {"fpf_budget": FPF_BUDGETS[i]}, "valid_mean": scores[i]["valid_mean"],
                        "grid_scores": scores}
        payload["per_seed"][m] = [{**r, "method": m} for r in rows[FPF_BUDGETS[i]]]
        payload["summary"][m] = summarize(payload["per_seed"][m])
        payload.setdefault("method_configs", {})[m] = {"fpf_budget": FPF_BUDGETS[i]}
    for key in [k for k in payload["summary"] if k not in payload["per_seed"]]:
        del payload["summary"][key]
    payload["methods"] = [m for m in payload["methods"] if m in payload["per_seed"]]
    points = grid_points(GRIDS[name])
    for m in KFPF_METHODS:
        scores = []
        for point, variant in zip(points, raw["grid"]):
            per_seed = [r["valid_final_average_accuracy"] for r in variant["per_seed"][m]]
            scores.append({**point, "valid_per_seed": per_seed, "valid_mean": statistics.fmean(per_seed)})
        i = choose(scores)
        selection[m] = {"chosen": points[i], "valid_mean": scores[i]["valid_mean"], "grid_scores": scores}
        _add_method(payload, raw["grid"][i], m, m, {k: raw["grid"][i]["config"][k] for k in points[i]})
    payload["per_seed"][ALL_MODULES] = [{**r, "method": ALL_MODULES} for r in all_modules["er+fpf"]]
    payload["summary"][ALL_MODULES] = summarize(payload["per_seed"][ALL_MODULES])
    payload["methods"].append(ALL_MODULES)
    payload["method_configs"][ALL_MODULES] = {"fpf_budget": 1.0}
    payload["validation"] = raw["validation"]
    payload["selection"] = {"grid": {"fpf_budget": list(FPF_BUDGETS), **{k: list(v) for k, v in GRIDS[name].items()}},
                            "criterion": "mean over seeds of the validation final average accuracy; ties: first "
                                         "grid point; test accuracies of unchosen grid points are not stored",
                            "fixed": "epochs, lr, batch, buffer, FPF's steps/lr, k-FPF's steps per phase and "
                                     "DER++'s alpha/beta are the preset's, identical for every method that has them",
                            **selection}
    payload["budget"] = raw["budget"]
    payload["trainable_parameters"] = raw["trainable_parameters"]
    payload["claims"] = claims(payload)
    payload["run_seconds_per_seed_set"] = raw["seconds"]
    payload["benchmark_seconds"] = sum(raw["seconds"].values())
    return payload


def run(name: str, seeds: list[int], log=print, **budget: int | None) -> dict:
    """collect() then finish(): the final payload of one benchmark."""
    return finish(collect(name, seeds, log, **budget))


def _mean_matrix(payload: dict, method: str) -> list[list[float]]:
    """Mean over seeds of the test accuracy matrix (row i: after task i; entries j > i are NaN)."""
    mats = [row["accuracy_matrix"] for row in payload["per_seed"][method]]
    t = len(payload["task_names"])
    return [[statistics.fmean(m[i][j] for m in mats) if j < len(mats[0][i]) and j <= i else float("nan")
             for j in range(t)] for i in range(len(mats[0]))]


MATRIX_METHODS = ("er", "er+fpf", "kfpf")


def plot(result: dict, path: Path) -> Path:
    """Per benchmark: test accuracy per method (mean ± std over seeds), k-FPF's validation grid, accuracy matrices."""
    from .plots import bars, new_figure, save

    benches = result["benchmarks"]
    cols = 2 + len(MATRIX_METHODS)
    fig = new_figure(4.6 * cols, 4.6 * len(benches), f"FPF / k-FPF, class-IL, seeds {result['seeds']} "
                                                     f"(FPF and k-FPF budgets, k chosen on validation): mean ± std over seeds")
    axes = fig.subplots(len(benches), cols, squeeze=False)
    for row, (name, payload) in enumerate(benches.items()):
        ax = axes[row]
        methods, summary = payload["methods"], payload["summary"]
        short = [m.replace(" (ablation)", "").replace("fine-tune all modules", "all modules") for m in methods]
        bars(ax[0], short, {"": [summary[m]["final_average_accuracy"]["mean"] for m in methods]},
             {"": [summary[m]["final_average_accuracy"]["std"] for m in methods]},
             f"{name}: test final avg. accuracy", "accuracy", "{:.2f}", rotate=True)
        sel = payload["selection"]
        for m, style in zip(KFPF_METHODS, ("o-", "s--")):
            for k in sel["grid"]["kfpf_k"]:
                pts = [s for s in sel[m]["grid_scores"] if s["kfpf_k"] == k]
                ax[1].errorbar([s["kfpf_budget"] for s in pts], [s["valid_mean"] for s in pts],
                               yerr=[statistics.stdev(s["valid_per_seed"]) if len(s["valid_per_seed"]) > 1 else 0
                                     for s in pts], fmt=style, capsize=3, label=f"{m}, k={k}")
            c = sel[m]["chosen"]
            ax[1].plot([c["kfpf_budget"]], [sel[m]["valid_mean"]], "k*", markersize=12)
        for m, style in zip(FPF_METHODS, ("^:", "v:")):
            pts = sel[m]["grid_scores"]
            ax[1].errorbar([s["fpf_budget"] for s in pts], [s["valid_mean"] for s in pts],
                           yerr=[statistics.stdev(s["valid_per_seed"]) if len(s["valid_per_seed"]) > 1 else 0
                                 for s in pts], fmt=style, capsize=3, label=f"{m} (FPF budget)")
            ax[1].plot([sel[m]["chosen"]["fpf_budget"]], [sel[m]["valid_mean"]], "k*", markersize=12)
        ax[1].set_title(f"{name}: validation grids (* chosen)")
        ax[1].set_xlabel("parameter budget of the module selection")
        ax[1].set_ylabel("validation final avg. accuracy")
        ax[1].grid(True, alpha=0.3)
        ax[1].legend(fontsize="x-small")
        tasks = payload["task_names"]
        for a, m in zip(ax[2:], MATRIX_METHODS):
            mat = _mean_matrix(payload, m)
            a.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            for i, r in enumerate(mat):
                for j, v in enumerate(r):
                    if v == v:
                        a.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                               color="white" if v < 0.6 else "black")
            a.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize="x-small")
            a.set_yticks(range(len(mat)), [f"after {t}" for t in tasks[:len(mat)]], fontsize="x-small")
            a.set_title(f"{name}, {m}: test accuracy matrix", fontsize="medium")
    return save(fig, path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    """Points (or %) with a sign; a rounding -0.0 shows as +0.0."""
    v = round(100 * x, 1)
    return f"{v + 0.0:+.1f}"


def _fmt_claim(c: dict) -> str:
    return ", ".join(_signed(x) for x in c["per_seed"])


def markdown(result: dict) -> str:
    """The README's results subsection, every number taken from `result`."""
    from unipeft.continual import markdown_table

    seeds = result["seeds"]
    lines = [f"### Results (`python -m benchmarks.continual_fpf`, class-IL, seeds {' '.join(map(str, seeds))}, "
             "mean ± std over seeds)", "",
             "![continual FPF results](benchmarks/results/continual_fpf.png)", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}", ""]
    lines += ["Protocol: " + result["protocol"], ""]
    for name, p in result["benchmarks"].items():
        v, b, sel = p["validation"], p["budget"], p["selection"]
        lines += [f"**{name}** ({p['trainable_parameters']:,} trainable parameters; its runs took "
                  f"{p['benchmark_seconds'] / 60:.1f} min in total on the shared 2-core machine, "
                  f"{len(p['run_seconds_per_seed_set'])} seed shard(s), at most two at a time)", "",
                  f"Data per task: train {v['train_per_task']}, validation {v['valid_per_task']} "
                  f"({100 * v['fraction']:g}% of each class's training examples, seed {v['seed']}), "
                  f"test {v['test_per_task']}. Budget: {b['epochs_per_task']} epochs per task "
                  f"({b['train_steps_per_task']} SGD steps of batch {b['batch_size']}), lr {b['lr']:g}, buffer "
                  f"{b['buffer_size']}; FPF {b['fpf_steps']} steps at lr {b['fpf_lr']:g}; k-FPF "
                  f"{b['kfpf_steps_per_phase']} steps per phase at the same lr.", "",
                  markdown_table(p).split("\n", 2)[2], "",
                  "Validation grids: final average accuracy (%) on the validation split, mean ± std over seeds "
                  "(chosen in bold). FPF's budget (the same grid for both):", "",
                  "| FPF budget | " + " | ".join(FPF_METHODS) + " |", "|---|" + "---|" * len(FPF_METHODS)]
        for i, b in enumerate(sel["grid"]["fpf_budget"]):
            cells = []
            for m in FPF_METHODS:
                s = sel[m]["grid_scores"][i]
                sd = statistics.stdev(s["valid_per_seed"]) if len(s["valid_per_seed"]) > 1 else 0.0
                cell = f"{_pct(s['valid_mean'])} ± {_pct(sd)}"
                cells.append(f"**{cell}**" if sel[m]["chosen"]["fpf_budget"] == b else cell)
            lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
        lines += ["", "k-FPF's budget and number of phases k:", "",
                  "| k-FPF budget | k | " + " | ".join(KFPF_METHODS) + " |", "|---|---|" + "---|" * len(KFPF_METHODS)]
        for i, point in enumerate(grid_points({k: sel["grid"][k] for k in ("kfpf_budget", "kfpf_k")})):
            cells = []
            for m in KFPF_METHODS:
                s = sel[m]["grid_scores"][i]
                sd = statistics.stdev(s["valid_per_seed"]) if len(s["valid_per_seed"]) > 1 else 0.0
                cell = f"{_pct(s['valid_mean'])} ± {_pct(sd)}"
                cells.append(f"**{cell}**" if sel[m]["chosen"] == point else cell)
            lines.append(f"| {point['kfpf_budget']:g} | {point['kfpf_k']} | " + " | ".join(cells) + " |")
        chosen = "; ".join(f"{m}: " + ", ".join(f"{k} {x:g}" for k, x in sel[m]["chosen"].items())
                           for m in (*FPF_METHODS, *KFPF_METHODS))
        modules = {}
        for seed, r in zip(p["seeds"], p["per_seed"]["er+fpf"]):
            modules.setdefault(", ".join(r["fpf_modules"]), []).append(seed)
        picked = "; ".join(f"{mods} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))})"
                           for mods, ss in modules.items())
        lines += ["", f"Chosen on validation: {chosen}. Modules FPF trains after ER at the chosen budget: {picked}."]
        n_test = sum(v["test_per_task"])
        lines += ["", f"Claims (per-seed paired differences in points, or compute savings in %, seeds "
                      f"{' '.join(map(str, p['seeds']))}; one test example = {100 / n_test:.2f} points of final "
                      "average accuracy on average):", "",
                  "| claim | A − B per seed | mean | threshold | band | verdict |", "|---|---|---|---|---|---|"]
        for c in p["claims"].values():
            lines.append(f"| {c['statement']} | {_fmt_claim(c)} | {_signed(c['mean'])} | {_signed(c['threshold'])} | "
                         f"{100 * c['band']:.1f} | {c['verdict']} |")
        lines.append("")
    lines += ["Columns: compute is relative to ER in the same run and seed. *batch-steps* counts examples "
              "back-propagated per batch size; *optimizer.step() calls* counts updates. Accuracies are "
              "deterministic by seed; wall and CPU times are not (shared machine).", "",
              "Verdict rules: " + "; ".join(f"{k}: {v}" for k, v in result["verdict_rules"].items()) + ".", ""]
    lines += summary_prose(result)
    return "\n".join(lines) + "\n"


def summary_prose(result: dict) -> list[str]:
    """One bullet per claim across the benchmarks: its verdicts and mean differences, from the JSON."""
    keys: list[str] = []
    for p in result["benchmarks"].values():
        keys += [k for k in p["claims"] if k not in keys]
    out = ["Which claims hold here:", ""]
    for key in keys:
        parts = []
        statement = None
        for name, p in result["benchmarks"].items():
            c = p["claims"].get(key)
            if c is None:
                continue
            statement = c["statement"]
            if c["unit"] == "accuracy":
                a, b = p["summary"][c["a"]]["final_average_accuracy"], p["summary"][c["b"]]["final_average_accuracy"]
                margin = f" against {_signed(c['threshold'])}" if c["threshold"] else ""
                parts.append(f"{name} **{c['verdict']}** ({c['a']} {_pct(a['mean'])} vs {c['b']} {_pct(b['mean'])}; "
                             f"paired difference {_signed(c['mean'])} points{margin}, band {100 * c['band']:.1f})")
            else:
                parts.append(f"{name} **{c['verdict']}** (mean {c['unit']} {100 * c['mean']:.0f}%, band "
                             f"{100 * c['band']:.1f})")
        out.append(f"- {statement}: " + "; ".join(parts) + ".")
    return out + [""]


def update_readme(result: dict, readme: Path) -> None:
    """Replace the continual section's results subsection (from '### Results' to its 'Tests (' paragraph)."""
    text = readme.read_text()
    start, end = text.index("<!-- section:continual -->"), text.index("<!-- /section:continual -->")
    section = text[start:end]
    m = re.search(r"^### Results.*?(?=^Tests \(`tests/continual/`)", section, flags=re.S | re.M)
    if m is None:
        raise ValueError(f"{readme}: no '### Results ... Tests (' block in the continual section")
    section = section[:m.start()] + markdown(result).rstrip("\n") + "\n\n" + section[m.end():]
    readme.write_text(text[:start] + section + text[end:])


PROTOCOL = (f"each task's training data keeps {100 * VALID_FRACTION:g}% of every class apart as validation "
            f"(seed {VALID_SEED}); all methods train on the rest. FPF's parameter budget (for ER+FPF and DER++ +FPF "
            "separately) and k-FPF's budget and number of FPF phases k (for k-FPF and k-FPF-KD separately) are "
            "chosen per benchmark on validation (best mean over seeds); every other hyper-parameter is the "
            "preset's and shared by the methods that have it. No choice reads test data.")


def _header(seeds: list[int]) -> dict:
    return {"versions": _versions(), "seeds": seeds, "protocol": PROTOCOL, "verdict_rules": VERDICT_RULES,
            "grids": {k: {g: list(v) for g, v in grid.items()} for k, grid in GRIDS.items()},
            "comparable_margin": COMPARABLE_MARGIN, "benchmarks": {}}


def _write(result: dict, out: Path) -> None:
    from .plots import png_path

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png_path(out))


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmarks (or merge per-benchmark JSONs), write the JSON + PNG, print the markdown."""
    from .plots import png_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", nargs="+", default=["seq-digits", "seq-fortunes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=RESULTS / "continual_fpf.json")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the preset's)")
    parser.add_argument("--fpf-steps", type=int, default=None, help="steps of the final FPF (default: the preset's)")
    parser.add_argument("--kfpf-steps", type=int, default=None, help="steps per k-FPF phase (default: the preset's)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="combine these result JSONs into --out")
    parser.add_argument("--no-run", action="store_true", help="only read --out (for --readme)")
    parser.add_argument("--readme", type=Path, default=None, help="regenerate this README's continual results")
    parser.add_argument("--note", default=None, help="a note stored in the JSON and printed in the README")
    parser.add_argument("--raw-out", type=Path, default=None,
                        help="only collect the runs of one benchmark (every grid point) into this file")
    parser.add_argument("--from-raw", type=Path, nargs="+", default=None,
                        help="finish collected runs (one benchmark may be split over seed sets) into --out")
    args = parser.parse_args(argv)
    budget = {"epochs": args.epochs, "fpf_steps": args.fpf_steps, "kfpf_steps": args.kfpf_steps}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more threads
    if args.raw_out is not None:
        if len(args.benchmark) != 1:
            parser.error("--raw-out takes exactly one --benchmark")
        raw = collect(args.benchmark[0], args.seeds, **budget)
        args.raw_out.parent.mkdir(parents=True, exist_ok=True)
        args.raw_out.write_text(json.dumps(raw) + "\n")
        print(f"wrote {args.raw_out}")
        return args.raw_out
    if args.no_run:
        result = json.loads(args.out.read_text())
    elif args.from_raw:
        raws: dict[str, list[dict]] = {}
        for path in args.from_raw:
            raw = json.loads(path.read_text())
            raws.setdefault(raw["name"], []).append(raw)
        result = _header(args.seeds)
        for name, parts in raws.items():
            result["benchmarks"][name] = finish(merge_raw(parts))
        seeds = {tuple(b["seeds"]) for b in result["benchmarks"].values()}
        result["seeds"] = list(seeds.pop()) if len(seeds) == 1 else sorted({s for x in seeds for s in x})
        _write(result, args.out)
    elif args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        result = {**parts[0], "benchmarks": {k: v for p in parts for k, v in p["benchmarks"].items()}}
        seeds = {tuple(b["seeds"]) for b in result["benchmarks"].values()}
        result["seeds"] = list(seeds.pop()) if len(seeds) == 1 else sorted({s for x in seeds for s in x})
        _write(result, args.out)
    else:
        result = _header(args.seeds)
        for name in args.benchmark:
            result["benchmarks"][name] = run(name, args.seeds, **budget)
            print(json.dumps({k: [c["verdict"], round(c["mean"], 4)]
                              for k, c in result["benchmarks"][name]["claims"].items()}, indent=1), flush=True)
            _write(result, args.out)  # after each benchmark: nothing is lost
    if args.note is not None:
        result["note"] = args.note
        _write(result, args.out)
    text = markdown(result)
    if args.readme is not None:
        update_readme(result, args.readme)
    print(text)
    print(f"wrote {args.out} and {png_path(args.out)}")
    return args.out


if __name__ == "__main__":
    main()
