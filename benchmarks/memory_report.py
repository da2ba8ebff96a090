"""Summary, verdicts, markdown and PNG of benchmarks/memory.py's runs (every figure from those runs).

Per method, the runs at its chosen lr (one per seed): test score mean and standard error, trainable
parameters, step time, the process peak training adds (median over seeds), its total with the weights, and
torch's split (weights, gradients, optimizer state, activations). The published claims, checked per seed
where they compare runs (a claim holds when every seed's value is on its side and the mean minus 2 standard
errors is too, does not hold when the mean plus 2 SE is on the other side, and is within noise otherwise):
- GaLore cuts the optimizer state by ~65% against AdamW (full fine-tuning of the same weights): cut >= 60%;
- MeZO's peak (weights + what training adds) is <= 1.2x that of inference at the same batch size;
- LST saves >= 2.7x the memory LoRA saves, both against full fine-tuning (peak with the weights);
- Sparse MeZO converges faster than MeZO at equal steps: mean validation gain over the shared eval points > 0.
MeZO's extra steps: the step at which LoRA's (and full fine-tuning's) validation curve first reaches MeZO's final
validation score, against MeZO's budget.
"""
from __future__ import annotations

import statistics

from .lora_family_report import FAILS, HOLDS, NOISE, label, mean_se

SPLIT = ("weights_mb", "gradients_mb", "optimizer_state_mb", "activations_mb")


def _side(values: list[float], bound: float, direction: str) -> dict:
    """Verdict of `values` (one per seed) against `bound` ('>=' or '<=')."""
    m, se = mean_se(values)
    sign = 1 if direction == ">=" else -1
    lo, hi = sign * (m - bound) - 2 * se, sign * (m - bound) + 2 * se
    ok = all(sign * (v - bound) >= 0 for v in values)
    verdict = HOLDS if ok and lo >= 0 else FAILS if hi < 0 else NOISE
    return {"mean": m, "band": [m - 2 * se, m + 2 * se], "per_seed": values, "target": f"{direction} {bound:g}",
            "verdict": verdict}


def _by_seed(runs: dict, name: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs.get(name, [])}


def _total(r: dict) -> float:
    return r["weights_mb"] + r["train_peak_mb"]


def _first_reach(curve: list, target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def summarise(rows: list[dict], chosen: dict[str, dict], infer: dict) -> dict:
    """Per-method figures and verdicts (`chosen`: method -> grid point; `infer`: the inference child)."""
    ok = [r for r in rows if "error" not in r]
    runs = {m: sorted((r for r in ok if r["method"] == m and label(r["point"]) == label(p)), key=lambda r: r["seed"])
            for m, p in chosen.items()}
    table = {}
    for m, rs in runs.items():
        acc, se = mean_se([r["test_accuracy"] for r in rs])
        table[m] = {"lr": chosen[m]["lr"], "seeds": len(rs), "test_mean": acc, "test_se": se,
                    "valid_mean": statistics.fmean(r["valid_accuracy"] for r in rs),
                    "trainable_params": rs[0]["trainable_params"], "optimizer": rs[0]["optimizer"],
                    "step_seconds": statistics.median(r["step_seconds"] for r in rs),
                    "train_peak_mb": statistics.median(r["train_peak_mb"] for r in rs),
                    "total_mb": statistics.median(_total(r) for r in rs),
                    **{k: statistics.median(r[k] for r in rs) for k in SPLIT}}
    claims = {}
    full, lora = _by_seed(runs, "full"), _by_seed(runs, "lora")
    for g in ("galore", "galore8bit"):
        cut = [1 - r["optimizer_state_mb"] / full[s]["optimizer_state_mb"] for s, r in _by_seed(runs, g).items()
               if s in full and full[s]["optimizer_state_mb"]]
        if cut:
            claims[f"{g}_optimizer_state_cut"] = _side(cut, 0.60, ">=")
    base = infer["weights_mb"] + infer["inference_peak_mb"]
    mezo = _by_seed(runs, "mezo")
    if mezo:
        claims["mezo_peak_vs_inference"] = _side([_total(r) / base for r in mezo.values()], 1.2, "<=")
    lst = _by_seed(runs, "lst")
    pairs = [(1 - _total(lst[s]) / _total(full[s]), 1 - _total(lora[s]) / _total(full[s]))
             for s in lst if s in full and s in lora]
    if pairs and all(b > 0 for _, b in pairs):
        claims["lst_saving_vs_lora_saving"] = {**_side([a / b for a, b in pairs], 2.7, ">="),
                                               "savings": [[round(a, 4), round(b, 4)] for a, b in pairs]}
    sparse = _by_seed(runs, "sparse_mezo")
    gains = []
    for s, r in sparse.items():
        if s in mezo:
            other = dict(map(tuple, mezo[s]["valid_curve"]))
            shared = [(acc, other[step]) for step, acc in r["valid_curve"] if step in other]
            if shared:
                gains.append(statistics.fmean(a - b for a, b in shared))
    if gains:
        claims["sparse_mezo_faster_than_mezo"] = _side(gains, 0.0, ">=") if len(gains) > 1 else \
            {"mean": gains[0], "per_seed": gains, "target": "> 0", "verdict": "one seed: " +
             ("gain" if gains[0] > 0 else "no gain")}
    extra = {}
    for s, r in mezo.items():
        final = r["valid_curve"][-1][1] if r["valid_curve"] else None
        for ref, table_ in (("lora", lora), ("full", full)):
            if final is not None and s in table_:
                curve = table_[s]["valid_curve"]
                extra.setdefault(ref, []).append({"seed": s, "mezo_final_valid": final, "mezo_steps": r["steps"],
                                                  "reference_reaches_at": _first_reach(curve, final),
                                                  "reference_first_eval": curve[0][0] if curve else None})
    return {"methods": table, "claims": claims, "mezo_steps": extra, "inference": infer,
            "chosen": chosen, "runs": rows}


def markdown(res: dict) -> str:
    """The results table, the claims and what they rest on."""
    t = res["methods"]
    full = t.get("full", {})
    lines = [f"# Memory-efficient training ({res['task']}: {res['metric']})", "",
             f"Generated by `{res['command']}` in {res['seconds']:.0f} s ({res['runs_trained']} runs trained, "
             f"{res['runs_reused']} reused from the cache); budget `{' '.join(res['budget'])}`, {res['seeds']} seed(s) "
             f"at each method's chosen lr (grids and sections in the JSON), one torch thread per run, allocator pinned "
             f"({', '.join(f'{k}={v}' for k, v in res['malloc_env'].items())}).", "",
             "| method | optimizer | lr | test (mean ± se) | trainable | step s | train peak MB | total MB (x full) "
             "| weights | gradients | optimizer state | activations |", "|" + "---|" * 12]
    for m, r in t.items():
        rel = f" ({r['total_mb'] / full['total_mb']:.2f}x)" if full.get("total_mb") else ""
        lines.append(f"| {m} | {r['optimizer']} | {r['lr']:g} | {r['test_mean']:.3f} ± {r['test_se']:.3f} | "
                     f"{r['trainable_params']:,} | {r['step_seconds']:.3f} | {r['train_peak_mb']:.0f} | "
                     f"{r['total_mb']:.0f}{rel} | " + " | ".join(f"{r[k]:.1f}" for k in SPLIT) + " |")
    inf = res["inference"]
    lines += ["", f"Inference of the full-weight model at the training batch size: peak {inf['inference_peak_mb']:.0f} MB "
              f"above {inf['weights_mb']:.0f} MB of weights (median of {inf['inference_peaks_mb']}).", "",
              "## Claims", "", "| claim | value | band (mean ± 2 se) | per seed | target | verdict |", "|---|---|---|---|---|---|"]
    for name, c in res["claims"].items():
        band = f"[{c['band'][0]:.3f}, {c['band'][1]:.3f}]" if "band" in c else "-"
        lines.append(f"| {name.replace('_', ' ')} | {c['mean']:.3f} | {band} | "
                     f"{', '.join(f'{v:.3f}' for v in c['per_seed'])} | {c['target']} | {c['verdict']} |")
    lines.append("")
    for ref, items in res["mezo_steps"].items():
        for it in items:
            at = it["reference_reaches_at"]
            if not at:
                how = "at no evaluation point"
            elif at == it["reference_first_eval"]:  # already at its first look: only a bound on MeZO's extra steps
                how = f"already at its first evaluation (step {at}): MeZO needed >= {it['mezo_steps'] / at:.1f}x the steps"
            else:
                how = f"at step {at}: MeZO needed {it['mezo_steps'] / at:.1f}x the steps"
            lines.append(f"- seed {it['seed']}: MeZO's final validation score {it['mezo_final_valid']:.3f} after "
                         f"{it['mezo_steps']} steps; {ref} reached it {how}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    """Memory split per method (stacked) with the measured peak, and test score against total memory."""
    from .plots import new_figure, save

    t = res["methods"]
    names = list(t)
    fig = new_figure(12, 4.4, f"Memory-efficient training ({res['task']})")
    ax1, ax2 = fig.subplots(1, 2)
    bottom = [0.0] * len(names)
    for k, key in enumerate(SPLIT):
        vals = [t[n][key] for n in names]
        ax1.bar(range(len(names)), vals, bottom=bottom, color=f"C{k}", label=key.replace("_mb", "").replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.scatter(range(len(names)), [t[n]["total_mb"] for n in names], color="black", marker="_", s=300,
                label="measured peak (weights + training)", zorder=3)
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
    ax1.set_ylabel("MB")
    ax1.set_title("torch's split and the process peak")
    ax1.legend(fontsize="x-small")
    for i, n in enumerate(names):
        ax2.errorbar(t[n]["total_mb"], t[n]["test_mean"], yerr=t[n]["test_se"] or None, fmt="o", color=f"C{i}")
        ax2.annotate(n, (t[n]["total_mb"], t[n]["test_mean"]), xytext=(4, 2), textcoords="offset points",
                     fontsize="x-small")
    ax2.set_xlabel("peak memory, MB (weights + training)")
    ax2.set_ylabel(f"test {res['metric']}")
    ax2.set_title("quality against memory")
    ax2.grid(True, alpha=0.3)
    save(fig, path)
