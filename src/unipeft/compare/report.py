"""What a comparison found: per-run JSON in PEFT's method-comparison layout, a summary table and a plot.

Per method the grid value with the best mean validation score over seeds is chosen (test is never read
for it); its test scores over seeds are reported as mean ± standard error, next to the no-training
baseline. Every sentence of compare.md is computed here from the runs.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def _file_size(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.rglob("*.safetensors")) if run_dir.is_dir() else 0


def run_rows(study, plan) -> list[dict[str, Any]]:
    """One row per grid trial: method, grid values, seed, state, summary numbers or the error."""
    single = next(iter(plan.space.families)) if len(plan.space.families) == 1 else None
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "surplus" in t.user_attrs:
            continue
        params = dict(t.params)
        run_dir = Path(plan.search.output_dir) / f"trial-{t.number:04d}"
        row = {"trial": t.number, "method": params.pop("method", single), "seed": params.pop("seed", None),
               "grid": params, "state": t.state.name, "error": t.user_attrs.get("error"),
               "peak_mib": t.user_attrs.get("peak_mib"), "run_config": t.user_attrs.get("run_config"),
               "started": str(t.datetime_start), "run_dir": str(run_dir)}
        if t.state.name == "COMPLETE" and (run_dir / SUMMARY).is_file():
            s = json.loads((run_dir / SUMMARY).read_text())
            row.update(valid=s["valid"], test=s["test"], trainable_params=s["trainable_params"],
                       total_params=s["total_params"], train_seconds=s["train_seconds"], steps=s["steps"],
                       file_size=_file_size(run_dir), seconds=t.duration.total_seconds() if t.duration else None)
        rows.append(row)
    return rows


def peft_layout(row: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    """A run as PEFT's method-comparison JSON (run_info / train_info / meta_info)."""
    cfg = row.get("run_config") or {}
    metrics = [] if "valid" not in row else [{"step": row["steps"], "split": "valid", **row["valid"]},
                                             {"step": row["steps"], "split": "test", **row["test"]}]
    return {
        "run_info": {"created_at": row["started"], "total_time": row.get("seconds"),
                     "experiment_name": f"{row['method']}/{json.dumps(row['grid'])}/seed{row['seed']}",
                     "train_config": {k: v for k, v in cfg.items() if k != "method"},
                     "peft_config": cfg.get("method"), "error_msg": row.get("error") or ""},
        "train_info": {"accelerator_memory_reserved_avg": None, "accelerator_memory_max": None,
                       "accelerator_memory_reserved_99th": None, "cpu_memory_peak_mib": row.get("peak_mib"),
                       "train_time": row.get("train_seconds"), "file_size": row.get("file_size"),
                       "num_trainable_params": row.get("trainable_params"),
                       "num_total_params": row.get("total_params"),
                       "status": "success" if "valid" in row else row["state"].lower(), "metrics": metrics},
        "meta_info": {"model_info": {"model_id": (cfg.get("model") or {}).get("name")},
                      "dataset_info": cfg.get("data"), "package_info": versions,
                      "system_info": {"system": platform.system(), "release": platform.release(),
                                      "machine": platform.machine(), "accelerator": "cpu"},
                      "pytorch_info": versions.get("torch")},
    }


def summarise(rows: list[dict[str, Any]], baselines: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per method: the grid point chosen on mean validation `metric`, its test mean ± SE over seeds."""
    methods: dict[str, Any] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        done = [r for r in mine if "valid" in r]
        if not done:
            errors = sorted({r["error"] for r in mine if r.get("error")})
            methods[name] = {"skipped": errors[0] if errors else "no run finished"}
            continue
        points: dict[str, list[dict]] = {}
        for r in done:
            points.setdefault(json.dumps(r["grid"], sort_keys=True), []).append(r)
        scored = {k: statistics.fmean(r["valid"][metric] for r in v) for k, v in points.items()}
        chosen = max(scored, key=scored.get)
        grid_values = sorted({json.dumps(r["grid"], sort_keys=True) for r in mine})
        runs = sorted(points[chosen], key=lambda r: r["seed"])
        test_m, test_se = _mean_se([r["test"][metric] for r in runs])
        valid_m, valid_se = _mean_se([r["valid"][metric] for r in runs])
        peaks = [r["peak_mib"] for r in runs if r.get("peak_mib") is not None]
        methods[name] = {
            "chosen": json.loads(chosen), "at_grid_edge": len(grid_values) > 2 and chosen in (grid_values[0], grid_values[-1]),
            "seeds": len(runs), "valid": [valid_m, valid_se], "test": [test_m, test_se],
            "test_per_seed": [r["test"][metric] for r in runs], "trainable_params": runs[0]["trainable_params"],
            "trainable_fraction": runs[0]["trainable_params"] / runs[0]["total_params"],
            "file_size": runs[0]["file_size"], "peak_mib": max(peaks) if peaks else None,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "valid_by_grid": scored,
        }
    base = None
    if baselines:
        base = {"test": list(_mean_se([b["test"][metric] for b in baselines])),
                "valid": list(_mean_se([b["valid"][metric] for b in baselines])), "seeds": len(baselines)}
    return {"metric": metric, "methods": methods, "baseline": base, "frontier": frontier(methods)}


def frontier(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """Which method wins at which budget: walking up the trainable-parameter counts, the methods whose test
    mean beats every smaller one's (each with its margin over the previous winner and that margin's band)."""
    ranked = sorted((m for m in methods.items() if "test" in m[1]), key=lambda m: m[1]["trainable_params"])
    out, best = [], None
    for name, m in ranked:
        if best is None or m["test"][0] > best[1]["test"][0]:
            entry = {"method": name, "trainable_params": m["trainable_params"], "test": m["test"][0]}
            if best is not None:
                se = math.hypot(m["test"][1], best[1]["test"][1])
                d = m["test"][0] - best[1]["test"][0]
                entry.update(over=best[0], margin=d, band=[d - 2 * se, d + 2 * se],
                             seeds=min(m["seeds"], best[1]["seeds"]))
            out.append(entry)
            best = (name, m)
    return out


def write_report(rows: list[dict[str, Any]], baselines: list[dict[str, Any]], metric: str, out: Path,
                 versions: dict[str, str]) -> dict[str, Any]:
    """runs/*.json, compare.json, compare.md and compare.png under `out`; returns the summary."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for r in rows:
        name = f"{r['method']}-{'-'.join(f'{k}{v}' for k, v in r['grid'].items())}-seed{r['seed']}.json"
        (out / "runs" / name.replace("/", "_")).write_text(json.dumps(peft_layout(r, versions), indent=1, default=str) + "\n")
    summary = summarise(rows, baselines, metric)
    summary["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["versions"] = versions
    (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "compare.md").write_text(markdown(summary))
    from .plot import plot
    plot(summary, out / "compare.png")
    return summary


def markdown(s: dict[str, Any]) -> str:
    metric = s["metric"]
    lines = [f"# Method comparison: test {metric}", "",
             f"Per method the grid point with the best mean validation {metric} over seeds; test mean ± SE.", "",
             f"| method | chosen | seeds | valid | test | trainable | fraction | file | peak MiB | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ranked = sorted(s["methods"].items(), key=lambda m: -m[1]["test"][0] if "test" in m[1] else math.inf)
    for name, m in ranked:
        if "test" not in m:
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in m["chosen"].items()) + (" (grid edge)" if m["at_grid_edge"] else "")
        peak = f"{m['peak_mib']:.0f}" if m["peak_mib"] is not None else "n/a"
        lines.append(f"| {name} | {chosen} | {m['seeds']} | {m['valid'][0]:.3f} ± {m['valid'][1]:.3f} | "
                     f"{m['test'][0]:.3f} ± {m['test'][1]:.3f} | {m['trainable_params']:,} | "
                     f"{m['trainable_fraction']:.2%} | {m['file_size'] / 1024:.0f} KB | {peak} | {m['train_seconds']:.1f} |")
    if s["baseline"]:
        b = s["baseline"]
        lines.append(f"| no training | - | {b['seeds']} | {b['valid'][0]:.3f} ± {b['valid'][1]:.3f} | "
                     f"{b['test'][0]:.3f} ± {b['test'][1]:.3f} | 0 | 0% | - | - | - |")
    skipped = [(n, m["skipped"]) for n, m in s["methods"].items() if "skipped" in m]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {n}: {why}" for n, why in skipped]
    lines += ["", "Which method wins at which parameter budget (smallest first; a winner beats every smaller method's test mean):", ""]
    for f in s["frontier"]:
        if "over" not in f:
            lines.append(f"- up to {f['trainable_params']:,} trainable parameters: {f['method']} ({f['test']:.3f})")
        else:
            noise = ("one seed each: no noise band" if f["seeds"] < 2 else
                     "within noise" if f["band"][0] <= 0 else "beyond 2 SE")
            lines.append(f"- from {f['trainable_params']:,}: {f['method']} ({f['test']:.3f}), "
                         f"+{f['margin']:.3f} over {f['over']} [{f['band'][0]:+.3f}, {f['band'][1]:+.3f}], {noise}")
    return "\n".join(lines) + "\n"
