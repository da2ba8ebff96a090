"""Summary, verdicts, markdown and PNG of benchmarks/lora_family.py's runs (every figure from those runs).

Per method, the runs at its chosen point (lr, with any method fields; one run per seed): the test score (the task's metric: accuracy,
or token accuracy for the causal LM; keys `*_accuracy` either way) mean and standard error,
trainable parameters (with and without the classifier head every run trains), adapter file
size, step time relative to LoRA (ratio of medians, 90% paired bootstrap band over seeds) and
the training time to first reach LoRA's final validation accuracy (mean over LoRA's seeds).
A claim about a difference holds when its mean over seeds minus 2 standard errors is on the
claimed side, does not hold when the mean plus 2 SE is on the other side, and is within noise
otherwise.
"""
from __future__ import annotations

import math
import statistics
import time

from .stats import bootstrap_band

HOLDS, NOISE, FAILS = "holds", "within noise", "does not hold"


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for one value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def judge(diffs: list[float], margin: float = 0.0) -> dict:
    """Whether mean(diffs) > margin beyond 2 SE (`diffs` paired by seed)."""
    m, se = mean_se(diffs)
    verdict = HOLDS if m - 2 * se > margin else FAILS if m + 2 * se < margin else NOISE
    return {"mean": m, "band": [m - 2 * se, m + 2 * se], "seeds": len(diffs), "verdict": verdict}


def _early_loss(row: dict, share: float = 0.25) -> float:
    """Mean logged training loss over the first `share` of the run's steps."""
    cut = max(1, int(share * row["steps"]))
    vals = [loss for step, loss in row["loss_curve"] if step <= cut] or [row["loss_curve"][0][1]]
    return statistics.fmean(vals)


def _time_to(row: dict, target: float) -> float | None:
    """Training seconds at the first validation point >= target (step x the run's step time), or None."""
    for step, acc in row["valid_curve"]:
        if acc >= target:
            return step * row["step_seconds"]
    return None


def label(point: dict) -> str:
    """How a grid point is shown and matched: the lr, then any method fields ("0.003 delora_lambda=1")."""
    return " ".join([f"{point['lr']:g}"] + [f"{k}={v:g}" for k, v in sorted(point.items()) if k != "lr"])


def summarise(rows: list[dict], chosen: dict[str, dict], methods: dict) -> dict:
    """Per-method figures and the published claims' verdicts (`chosen`: method -> grid point)."""
    ok = [r for r in rows if "error" not in r]
    runs = {m: sorted((r for r in ok if r["method"] == m and r["setting"] == label(p)), key=lambda r: r["seed"])
            for m, p in chosen.items()}
    lora = runs["lora"]
    target = statistics.fmean(r["valid_accuracy"] for r in lora)
    per: dict[str, dict] = {}
    for m, rs in runs.items():
        acc, se = mean_se([r["test_accuracy"] for r in rs])
        seeds = [r["seed"] for r in rs]
        base = [r for r in lora if r["seed"] in seeds]
        mine = [r for r in rs if r["seed"] in {b["seed"] for b in base}]
        step = [r["step_seconds"] for r in mine]
        ref = [r["step_seconds"] for r in base]
        times = [_time_to(r, target) for r in rs]
        reached = [t for t in times if t is not None]
        per[m] = {"lr": chosen[m]["lr"], "setting": label(chosen[m]), "seeds": seeds, "test_accuracy": acc,
                  "test_accuracy_se": se,
                  "valid_accuracy": statistics.fmean(r["valid_accuracy"] for r in rs),
                  "trainable_params": rs[0]["trainable_params"], "adapter_params": rs[0]["adapter_params"],
                  "file_bytes": rs[0]["file_bytes"],
                  "step_time_vs_lora": statistics.median(step) / statistics.median(ref) if step else None,
                  "step_time_band": list(bootstrap_band(step, ref)) if step else None,
                  "time_to_lora_valid_s": statistics.median(reached) if reached else None,
                  "reached_lora_valid": f"{len(reached)}/{len(rs)}",
                  "grid": {r["setting"]: r["valid_accuracy"] for r in ok if r["method"] == m and r["seed"] == 0}}
    return {"methods": per, "lora_valid_target": target, "claims": claims(runs, per),
            "failed": [{k: r[k] for k in ("method", "setting", "seed", "error")} for r in rows if "error" in r],
            "runs": rows, "declared": {m: {"method": s, "lr_grid": g, "overrides": e} for m, (s, g, e) in methods.items()}}


def _paired(runs: dict, a: str, b: str, value) -> list[float]:
    """value(run of a) - value(run of b) for each seed both have."""
    by_seed = {r["seed"]: r for r in runs[b]}
    return [value(r) - value(by_seed[r["seed"]]) for r in runs[a] if r["seed"] in by_seed]


def claims(runs: dict, per: dict) -> dict:
    """The issue's published claims, judged on these runs (missing methods: not measured)."""
    out: dict[str, dict] = {}
    if "pissa" in runs:
        j = judge(_paired(runs, "lora", "pissa", _early_loss))
        out["pissa_converges_faster"] = {**j, "what": "LoRA minus PiSSA mean training loss over the first 25% of "
                                                    "steps (positive: PiSSA lower)"}
    if "vera" in runs:
        lora_acc = {r["seed"]: r["test_accuracy"] for r in runs["lora"]}
        share = [r["test_accuracy"] / lora_acc[r["seed"]] for r in runs["vera"] if r["seed"] in lora_acc]
        acc = judge([s - 0.95 for s in share])
        fewer = per["lora"]["adapter_params"] / max(1, per["vera"]["adapter_params"])
        both = acc["verdict"] if fewer >= 10 else FAILS
        out["vera_95pct_with_10x_fewer"] = {**acc, "accuracy_share": statistics.fmean(share),
                                            "fewer_params_x": fewer, "verdict": both,
                                            "what": "VeRA/LoRA test score minus 0.95, and LoRA/VeRA adapter "
                                                    "parameters (>= 10 needed)"}
    if "adalora" in runs:
        j = judge(_paired(runs, "adalora", "lora", lambda r: r["test_accuracy"]), margin=0.0)
        out["adalora_at_least_lora"] = {**j, "what": "AdaLoRA minus LoRA test score; AdaLoRA ends at the "
                                                     "budget target_r=8 per module (starts at init_r=12)",
                                        "adalora_params": per["adalora"]["adapter_params"],
                                        "lora_params": per["lora"]["adapter_params"]}
    for m in ("nola", "vblora"):
        if m in per:
            out[f"{m}_file_vs_lora"] = {"ratio": per[m]["file_bytes"] / per["lora"]["file_bytes"],
                                        "bytes": per[m]["file_bytes"], "lora_bytes": per["lora"]["file_bytes"],
                                        "what": f"{m} adapter file bytes / LoRA's"}
    return out


def metadata(args, seconds: float, config) -> dict:
    """How and where the figures were made."""
    from .common import versions

    return {"config": str(config), "seeds": args.seeds, "workers": args.workers, "eval_every": args.eval_every,
            "max_steps": args.max_steps, "max_per_category": args.max_per_category,
            "max_examples": args.max_examples, "extend_edges": args.extend_edges, "torch_threads_per_run": 1,
            "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M"), **versions()}


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(res: dict) -> str:
    """The table and the claims, every number from the JSON."""
    metric = res.get("metric", "accuracy").replace("_", " ")
    lines = [f"LoRA family on {res['config']} ({res['seeds']} seeds, lr (and DeLoRA's lambda) chosen on validation {metric} "
             f"with seed 0, the lr grid widened at a chosen edge up to {res.get('extend_edges', 0)} times; "
             f"{res['workers']} runs at once, one thread each; overrides {' '.join(res.get('budget', []))}; "
             f"{res['seconds']:.0f} s for the {res.get('runs_trained', 0)} runs trained in this invocation, "
             f"{res.get('runs_reused', 0)} more reused from the run cache of earlier ones)", "",
             f"| method | lr (fields) | test {metric} | trainable | adapter params | file KiB | step time / LoRA [90%] | "
             f"s to LoRA valid {res['lora_valid_target']:.3f} |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, p in res["methods"].items():
        band = p["step_time_band"]
        lines.append(f"| {m} | {p['setting']} | {p['test_accuracy']:.3f} ± {p['test_accuracy_se']:.3f} | "
                     f"{p['trainable_params']:,} | {p['adapter_params']:,} | {p['file_bytes'] / 1024:.0f} | "
                     f"{_f(p['step_time_vs_lora'], '{:.2f}')} [{_f(band and band[0], '{:.2f}')}, "
                     f"{_f(band and band[1], '{:.2f}')}] | {_f(p['time_to_lora_valid_s'], '{:.0f}')} "
                     f"({p['reached_lora_valid']}) |")
    lines += ["", "| claim | measured | verdict |", "|---|---|---|"]
    for name, c in res["claims"].items():
        if "verdict" in c:
            shown = f"{c['what']}: {c['mean']:+.3f} [{c['band'][0]:+.3f}, {c['band'][1]:+.3f}]"
            if "fewer_params_x" in c:
                shown += f"; {c['fewer_params_x']:.1f}x fewer parameters"
            lines.append(f"| {name} | {shown} | {c['verdict']} |")
        else:
            lines.append(f"| {name} | {c['what']}: {c['ratio']:.3f} ({c['bytes']:,} vs {c['lora_bytes']:,}) | - |")
    if res["failed"]:
        lines += ["", "Failed runs: " + "; ".join(f"{f['method']} {f['setting']} seed={f['seed']}: "
                                                  f"{' '.join(f['error'])}" for f in res["failed"])]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    """Test accuracy, trainable parameters, file size and step time per method; LoRA vs PiSSA loss curves."""
    from .plots import bars, curves, panels, save

    per = res["methods"]
    names = list(per)
    fig, axes = panels(5, f"LoRA family on {res['config']}: {res['seeds']} seeds at the lr chosen on validation",
                       cols=2, size=(max(6.0, 0.45 * len(names)), 3.2))
    metric = res.get("metric", "accuracy").replace("_", " ")
    bars(axes[0], names, {"": [per[m]["test_accuracy"] for m in names]},
         {"": [per[m]["test_accuracy_se"] for m in names]}, title=f"test {metric} (± SE)", rotate=True)
    bars(axes[1], names, {"": [per[m]["adapter_params"] for m in names]}, title="adapter parameters (log)",
         rotate=True)
    axes[1].set_yscale("log")
    bars(axes[2], names, {"": [per[m]["file_bytes"] / 1024 for m in names]}, title="adapter file KiB (log)",
         rotate=True)
    axes[2].set_yscale("log")
    bars(axes[3], names, {"": [per[m]["step_time_vs_lora"] for m in names]}, title="step time / LoRA", rotate=True)
    runs = [r for r in res["runs"] if "error" not in r]
    series = {}
    for m in ("lora", "pissa"):
        if m in per:
            r = next(r for r in runs if r["method"] == m and r["setting"] == per[m]["setting"] and r["seed"] == 0)
            series[f"{m} (seed 0)"] = ([s for s, _ in r["loss_curve"]], [v for _, v in r["loss_curve"]])
    curves(axes[4], series, title="training loss", ylabel="loss", marker="")
    save(fig, path)
