"""Summary, findings, markdown and PNG of benchmarks/merging.py's rows (every number and verdict from them).

A value is shown as the mean over seeds ± its band, 2 standard errors of that mean (0 with one seed). A
difference (paired by seed) "holds" when its band lies wholly on the claimed side, "does not hold" when
it lies wholly on the other side, and is "within noise" otherwise (lora_family_report.judge). Accuracies
are fractions in the JSON and points (x100) in the sentences about drops.
"""
from __future__ import annotations

import statistics

from .lora_family_report import FAILS, HOLDS, NOISE, judge, mean_se

COMMAND = "nice -n 19 .venv/bin/python -m benchmarks.merging --seeds 3"
EXPECTED = ("about 35 minutes on a quiet machine with one torch thread for 3 seeds (an estimate from measured step "
            "and evaluation times); an interrupted run continues from its cache")
TARGET_RATIO, TARGET_DROP = (8.0, 50.0), 1.0  # the ComPEFT target: 8-50x smaller, <= 1 point lost
SECTIONS = [
    ("Per-task test accuracy of each merge", "the 4 task adapters merged into one by each method (lambda chosen on "
     "validation per seed), scored on every task, beside each task's own adapter (individual), the multitask "
     "adapter trained on all tasks' data and the base with no adapter (the shared head alone)"),
    ("ComPEFT", "the multitask (default-task) adapter's tensors kept at each density (largest magnitudes) and "
     "ternarised with one mean-|value| scale per tensor (no tuning); compression ratio = bytes of the adapter file "
     "/ bytes of the compressed one; drop = 8-way test accuracy lost, in points"),
    ("LoRA extraction", "a LoRA of each rank extracted from the full fine-tune proxy's weight deltas; 8-way test "
     "accuracy relative to the fine-tune itself"),
]


def band(xs: list[float]) -> dict:
    """Mean, 2 SE, and the values."""
    m, se = mean_se(xs)
    return {"mean": m, "pm": 2 * se, "values": xs}


def _task_rows(res: dict) -> dict[str, list[dict]]:
    """name -> per seed {task: accuracy}: individual, multitask, base, then every merge."""
    tasks = list(res["tasks"])
    out = {"individual": [{t: ps["individual"][t]["tasks"][t] for t in tasks} for ps in res["per_seed"]],
           "multitask": [ps["multitask"]["tasks"] for ps in res["per_seed"]],
           "base": [ps["base"]["tasks"] for ps in res["per_seed"]]}
    for name in res["per_seed"][0]["merges"]:
        out[name] = [ps["merges"][name]["test"]["tasks"] for ps in res["per_seed"]]
    return out


def ratio_of(summary: dict) -> float:
    """A compression summary's ratio (its own field, else bytes before / after)."""
    for key in ("ratio", "compression_ratio"):
        if key in summary:
            return float(summary[key])
    return float(summary["bytes_before"]) / float(summary["bytes_after"])


def _drop_verdict(drops: list[float]) -> dict:
    """Whether the drop (points) is <= TARGET_DROP: judged as TARGET_DROP - drop > 0 beyond the band."""
    j = judge([TARGET_DROP - d for d in drops])
    return {"drop": band(drops), "verdict": j["verdict"]}


def summarise(res: dict) -> dict:
    """Bands of every table cell, paired differences, and the findings sentences."""
    tasks, seeds = list(res["tasks"]), res["per_seed"]
    rows = _task_rows(res)
    ind_mean = [statistics.fmean(r.values()) for r in rows["individual"]]
    multi_mean = [statistics.fmean(r[t] for t in tasks) for r in rows["multitask"]]
    methods = {}
    for name, per in rows.items():
        means = [statistics.fmean(r[t] for t in tasks) for r in per]
        entry = {"tasks": {t: band([r[t] for r in per]) for t in tasks}, "mean": band(means)}
        if name not in ("individual",):
            entry["minus_individual"] = judge([a - b for a, b in zip(means, ind_mean)])
            entry["minus_multitask"] = judge([a - b for a, b in zip(means, multi_mean)])
            entry["normalized"] = band([statistics.fmean(r[t] / i[t] for t in tasks)
                                        for r, i in zip(per, rows["individual"])])
        if name in seeds[0]["merges"] and "lambda" in seeds[0]["merges"][name]:
            entry["lambda"] = [ps["merges"][name]["lambda"] for ps in seeds]
        methods[name] = entry
    compression = {}
    for d in seeds[0]["compression"]:
        ref = [ps["multitask"]["accuracy"] for ps in seeds]
        acc = [ps["compression"][d]["test"]["accuracy"] for ps in seeds]
        compression[d] = {"ratio": band([ratio_of(ps["compression"][d]["summary"]) for ps in seeds]),
                          "accuracy": band(acc), **_drop_verdict([100 * (a - b) for a, b in zip(ref, acc)])}
    extraction = {}
    for r in seeds[0]["full"]["ranks"]:
        rel = [ps["full"]["ranks"][r]["test"]["accuracy"] / ps["full"]["test"]["accuracy"] for ps in seeds]
        drops = [100 * (ps["full"]["test"]["accuracy"] - ps["full"]["ranks"][r]["test"]["accuracy"]) for ps in seeds]
        extraction[r] = {"relative": band(rel), "accuracy": band([ps["full"]["ranks"][r]["test"]["accuracy"]
                                                                  for ps in seeds]), **_drop_verdict(drops)}
    out = {"methods": methods, "compression": compression, "extraction": extraction,
           "full_accuracy": band([ps["full"]["test"]["accuracy"] for ps in seeds]),
           "uncompressed_accuracy": band([ps["multitask"]["accuracy"] for ps in seeds])}
    out["findings"] = findings(out, [n for n in methods if n in seeds[0]["merges"]])
    return {"summary": out}


def _pm(b: dict, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(scale * b['mean'])} ± {fmt.format(scale * b['pm'])}"


def _diff(j: dict) -> str:
    return f"{100 * j['mean']:+.1f} points [{100 * j['band'][0]:+.1f}, {100 * j['band'][1]:+.1f}]"


def findings(s: dict, merges: list[str]) -> list[str]:
    """Sentences built from the summary alone: the best merge, how many merges match the references, the
    smallest ComPEFT density within the 1-point target, the smallest extraction rank within 1 point."""
    m = s["methods"]
    out = []
    best = max(merges, key=lambda n: m[n]["mean"]["mean"])
    vs = m[best]["minus_individual"]
    out.append(f"Highest mean test task accuracy among the merges: {best} ({_pm(m[best]['mean'])}), vs "
               f"{_pm(m['individual']['mean'])} for the individual adapters (difference {_diff(vs)}; "
               f"merge higher: {vs['verdict']}) and {_pm(m['multitask']['mean'])} for the "
               f"multitask adapter ({_diff(m[best]['minus_multitask'])}).")
    for ref in ("individual", "multitask"):
        below = [n for n in merges if m[n][f"minus_{ref}"]["verdict"] == FAILS]
        noise = [n for n in merges if m[n][f"minus_{ref}"]["verdict"] == NOISE]
        above = [n for n in merges if m[n][f"minus_{ref}"]["verdict"] == HOLDS]
        out.append(f"Against the {ref} adapter{'s' if ref == 'individual' else ''}: {len(below)} of {len(merges)} "
                   f"merges are lower beyond the band, {len(noise)} within noise"
                   + (f" ({', '.join(noise)})" if noise else "") + f", {len(above)} higher"
                   + (f" ({', '.join(above)})" if above else "") + ".")
    base = m["base"]["mean"]
    over = [n for n in merges if min(m[n]["mean"]["values"]) > max(base["values"])]
    out.append(f"{len(over)} of {len(merges)} merges beat the base with no adapter ({_pm(base)}) on every seed.")
    out += _compression_findings(s)
    ext = s["extraction"]
    if ext:
        ok = [r for r in ext if ext[r]["verdict"] == HOLDS]
        first = min(ok, key=int) if ok else None
        top = max(ext, key=int)
        out.append((f"LoRA extraction: rank {first} is the smallest rank whose 8-way test accuracy stays within "
                    f"{TARGET_DROP:g} point of the full fine-tune proxy ({_pm(s['full_accuracy'])}) beyond the band "
                    f"(drop {_pm(ext[first]['drop'], fmt='{:.1f}')} points, {_pm(ext[first]['relative'])} of it)"
                    if first else f"LoRA extraction: no rank up to {top} keeps the drop within {TARGET_DROP:g} point "
                    f"beyond the band") + f"; rank {top} reaches {_pm(ext[top]['relative'])} of the fine-tune.")
    return out


def _compression_findings(s: dict) -> list[str]:
    comp = s["compression"]
    if not comp:
        return []
    ordered = sorted(comp, key=float)
    ok = [d for d in ordered if comp[d]["verdict"] == HOLDS]
    first = ok[0] if ok else None
    ref = _pm(s["uncompressed_accuracy"])
    lines = [f"ComPEFT: density {first} is the smallest tested whose 8-way test accuracy drop stays <= "
             f"{TARGET_DROP:g} point beyond the band: {comp[first]['ratio']['mean']:.1f}x smaller, drop "
             f"{_pm(comp[first]['drop'], fmt='{:.1f}')} points from {ref}." if first else
             f"ComPEFT: no tested density keeps the drop <= {TARGET_DROP:g} point beyond the band (from {ref}); "
             + "; ".join(f"density {d}: {comp[d]['ratio']['mean']:.1f}x, drop {_pm(comp[d]['drop'], fmt='{:.1f}')}"
                         for d in ordered) + "."]
    lo, hi = TARGET_RATIO
    inside = [d for d in ordered if lo <= comp[d]["ratio"]["mean"] <= hi]
    verdicts = {d: comp[d]["verdict"] for d in inside}
    target = HOLDS if HOLDS in verdicts.values() else NOISE if NOISE in verdicts.values() else FAILS
    lines.append(f"Target {lo:g}-{hi:g}x smaller with <= {TARGET_DROP:g} point lost: {target}"
                 + (" (densities in that ratio range: " + ", ".join(f"{d} at {comp[d]['ratio']['mean']:.1f}x: "
                                                                      f"{v}" for d, v in verdicts.items()) + ")"
                    if inside else " (no tested density lands in that ratio range)") + ".")
    return lines


def markdown(res: dict) -> str:
    """How to run it, what each section measures, the three tables and the findings."""
    s, tasks = res["summary"], list(res["tasks"])
    lrs = res["lrs"]
    quick = ", --quick" if res["quick"] else ""
    lines = [f"# Merging and compressing fortunes LoRA adapters ({res['seeds']} seed(s){quick})",
             "", f"Full run: `{COMMAND}` ({EXPECTED}). This run: {res['seconds']:.0f} s, {res['runs_computed']} "
             f"results computed, {res['runs_reused']} reused from the cache; budget overrides: "
             f"{' '.join(res['budget']) or 'none (the config’s 3 epochs, 200 per topic)'}; "
             f"examples {res['examples']}.",
             "", f"Tasks (disjoint topic pairs of {res['config']}, one shared frozen 8-way head): "
             + "; ".join(f"{t} = {' vs '.join(c)}" for t, c in res["tasks"].items())
             + f". Chosen on seed-0 validation: task adapters lr {lrs['task']:g}, multitask lr {lrs['multitask']:g}, "
             f"full fine-tune proxy lr {lrs['full']:g}. Bands: ± 2 SE over seeds.", ""]
    lines += [f"- **{title}**: {what}." for title, what in SECTIONS]
    lines += ["", "aTLAS learns its per-block coefficients on a few validation batches (no lambda grid); every "
                  "other merge's lambda is chosen per seed on validation from the grids in the JSON (`declared`)."]
    if res["seeds"] == 1:
        lines.append("One seed: every band is 0, so the verdicts below only restate the sign of one difference.")
    lines += ["", "| adapter | " + " | ".join(tasks) + " | mean | minus individual | normalized | lambda |",
              "|---|" + "---:|" * (len(tasks) + 4)]
    for name, e in s["methods"].items():
        diff = e.get("minus_individual")
        lam = ", ".join(f"{x:g}" for x in e["lambda"]) if "lambda" in e else "-"
        lines.append(f"| {name} | " + " | ".join(_pm(e["tasks"][t]) for t in tasks) + f" | {_pm(e['mean'])} | "
                     + (f"{_diff(diff)} {diff['verdict']}" if diff else "-") + " | "
                     + (_pm(e["normalized"]) if "normalized" in e else "-") + f" | {lam} |")
    lines += ["", f"ComPEFT of the multitask adapter (uncompressed 8-way test accuracy "
                  f"{_pm(s['uncompressed_accuracy'])}):", "",
              "| density | ratio | test accuracy | drop (points) | drop <= 1 point |", "|---:|---:|---:|---:|---|"]
    for d, c in sorted(s["compression"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {d} | {c['ratio']['mean']:.1f}x | {_pm(c['accuracy'])} | {_pm(c['drop'], fmt='{:.1f}')} | "
                     f"{c['verdict']} |")
    lines += ["", f"LoRA extracted from the full fine-tune proxy (8-way test accuracy {_pm(s['full_accuracy'])}):", "",
              "| rank | test accuracy | relative to the fine-tune | drop (points) | drop <= 1 point |",
              "|---:|---:|---:|---:|---|"]
    for r, e in sorted(s["extraction"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {r} | {_pm(e['accuracy'])} | {_pm(e['relative'])} | {_pm(e['drop'], fmt='{:.1f}')} | "
                     f"{e['verdict']} |")
    lines += ["", "Findings:", ""] + [f"- {f}" for f in s["findings"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    """Per-method per-task test accuracy; ComPEFT ratio vs drop; extraction rank vs relative accuracy."""
    from .plots import bars, new_figure, save

    s, tasks = res["summary"], list(res["tasks"])
    names = list(s["methods"])
    fig = new_figure(max(12.0, 0.8 * len(names) + 4), 8.0, f"Merging fortunes LoRA adapters ({res['config']}, "
                                                           f"{res['seeds']} seed(s), bands ± 2 SE)")
    grid = fig.subplot_mosaic([["merge", "merge"], ["comp", "ext"]])
    bars(grid["merge"], names, {t: [s["methods"][n]["tasks"][t]["mean"] for n in names] for t in tasks},
         {t: [s["methods"][n]["tasks"][t]["pm"] for n in names] for t in tasks}, title="per-task test accuracy",
         ylabel="accuracy", rotate=True)
    grid["merge"].legend(fontsize="small", ncol=len(tasks), loc="lower right")  # below the tops of the bars
    ax = grid["comp"]
    comp = sorted(s["compression"].items(), key=lambda kv: float(kv[0]))
    ax.errorbar([c["ratio"]["mean"] for _, c in comp], [c["drop"]["mean"] for _, c in comp],
                yerr=[c["drop"]["pm"] for _, c in comp], marker="o", capsize=3)
    for d, c in comp:
        ax.annotate(f"density {d}", (c["ratio"]["mean"], c["drop"]["mean"]), xytext=(4, 4),
                    textcoords="offset points", fontsize="x-small")
    ax.axhline(TARGET_DROP, color="C3", linestyle="--", label=f"{TARGET_DROP:g} point")
    ax.axvspan(*TARGET_RATIO, color="C2", alpha=0.1, label=f"{TARGET_RATIO[0]:g}-{TARGET_RATIO[1]:g}x")
    ax.set_xscale("log")
    ax.set(title="ComPEFT: compression vs 8-way test accuracy drop", xlabel="compression ratio (log)",
           ylabel="drop (points)")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    ax = grid["ext"]
    ext = sorted(s["extraction"].items(), key=lambda kv: int(kv[0]))
    ax.errorbar([int(r) for r, _ in ext], [e["relative"]["mean"] for _, e in ext],
                yerr=[e["relative"]["pm"] for _, e in ext], marker="o", capsize=3)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(r) for r, _ in ext], [r for r, _ in ext])
    ax.set(title="LoRA extraction: accuracy / full fine-tune", xlabel="rank", ylabel="relative test accuracy")
    ax.grid(True, alpha=0.3)
    save(fig, path)
