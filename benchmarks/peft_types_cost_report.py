"""Verdicts, markdown and PNG of benchmarks/peft_types_cost.py (every sentence computed from its rows).

Verdict of a type's unipeft / PEFT step-time ratio, read from its 90% paired-bootstrap band: "faster"
when the whole band is below 1, "slower" when the whole band is above 1, "within noise" when it
straddles 1. Memory figures are one child process each (no band), so they carry no verdict.
"""
from __future__ import annotations

from .table import band

FASTER, SLOWER, NOISE = "faster", "slower", "within noise"


def time_verdict(fig: dict | None) -> str | None:
    """'faster' / 'slower' / 'within noise' for a unipeft / PEFT ratio and its band; None without one."""
    if not fig:
        return None
    lo, hi = min(fig["band"]), max(fig["band"])
    return FASTER if hi < 1 else SLOWER if lo > 1 else NOISE


def _div(a, b) -> float | None:
    return None if a is None or not b else a / b


def summarise(res: dict) -> dict:
    """Add each measured row's verdict and its count and memory ratios (to PEFT, to LoRA of the same library)."""
    lora = next((r for r in res["rows"] if r["method"] == "lora"), {})
    lora_mem = lora.get("peak_mb", {})
    for r in res["rows"]:
        if r["status"] != "measured":
            continue
        r["verdict"] = time_verdict(r.get("unipeft_over_peft"))
        r["params_over_lora"] = {lib: n / res["lora_params"] for lib, n in r["params"].items()}
        mem = r.get("peak_mb", {})
        r["mem_unipeft_over_peft"] = _div(mem.get("unipeft"), mem.get("peft"))
        r["mem_over_lora"] = {lib: _div(mem.get(lib), lora_mem.get(lib)) for lib in mem}
    measured = [r for r in res["rows"] if r.get("verdict")]
    res["verdict_counts"] = {v: sum(r["verdict"] == v for r in measured) for v in (FASTER, NOISE, SLOWER)}
    return res


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def one_line(row: dict) -> str:
    """A progress line for one row."""
    if row["status"] == "not applicable":
        return f"not applicable ({row['reason']})"
    if row["status"] == "failed":
        return "failed: " + "; ".join(f"{k}: {v[:160]}" for k, v in row["errors"].items())
    errs = f"; errors: {', '.join(row['errors'])}" if row["errors"] else ""
    return f"unipeft/peft {band(row.get('unipeft_over_peft'))}, params {row['params']}{errs}"


def _size(r: dict) -> str:
    s = r.get("size") or {}
    return "-" if not s.get("field") else f"{s['field']}={s.get('label', s.get('value'))}"


def _row(r: dict) -> str:
    p, pl = r["params"], r.get("params_over_lora", {})
    params = " / ".join(f"{p[k]:,} ({pl[k]:.2f}x)" if k in p else "-" for k in ("unipeft", "peft"))
    secs = r.get("seconds", {})
    step = " / ".join(_f(secs.get(f"{lib}/{r['method']}"), 3) for lib in ("unipeft", "peft"))
    mem = r.get("peak_mb", {})
    mem_s = " / ".join(_f(mem.get(k), 1) for k in ("unipeft", "peft")) if mem else "not measured"
    ml = r.get("mem_over_lora", {})
    errs = "; ".join(f"{k}: {v[:150]}" for k, v in r["errors"].items()).replace("|", "/").replace("\n", " ") or "-"
    return (f"| {r['method']} | {r['peft_type']} | {_size(r)} | {params} | {step} | "
            f"{band(r.get('unipeft_over_peft'))} | {r.get('verdict') or '-'} | {band(r.get('unipeft_over_lora'))} | "
            f"{band(r.get('peft_over_lora'))} | {mem_s} | {_f(r.get('mem_unipeft_over_peft'))} | "
            f"{_f(ml.get('unipeft'))} / {_f(ml.get('peft'))} | {errs} |")


def _findings(res: dict) -> list[str]:
    rows = res["rows"]
    measured = [r for r in rows if r.get("verdict")]
    c = res["verdict_counts"]
    out = [f"{len(measured)} types measured in both libraries: unipeft is faster beyond the band on {c[FASTER]}, "
           f"slower beyond the band on {c[SLOWER]}, within noise on {c[NOISE]}."]
    slower = sorted((r for r in measured if r["verdict"] == SLOWER), key=lambda r: -r["unipeft_over_peft"]["ratio"])
    if slower:
        out.append("Slower than PEFT beyond the band: " + ", ".join(
            f"{r['method']} ({band(r['unipeft_over_peft'])})" for r in slower) + ".")
    faster = sorted((r for r in measured if r["verdict"] == FASTER), key=lambda r: r["unipeft_over_peft"]["ratio"])
    if faster:
        out.append("Faster than PEFT beyond the band: " + ", ".join(
            f"{r['method']} ({band(r['unipeft_over_peft'])})" for r in faster) + ".")
    one_sided = [r for r in rows if r["status"] == "measured" and not r.get("verdict")]
    if one_sided:
        out.append("Measured in one library only (the other failed): " + ", ".join(
            f"{r['method']} ({', '.join(k for k in r['errors'])} failed)" for r in one_sided) + ".")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        out.append("Failed in both libraries: " + ", ".join(r["method"] for r in failed) + ".")
    mismatch = [r for r in measured if len(set(r["params"].values())) > 1]
    if mismatch:
        out.append("Trainable counts differ between the libraries: " + ", ".join(
            f"{r['method']} ({r['params']['unipeft']:,} vs {r['params']['peft']:,})" for r in mismatch) + ".")
    else:
        out.append("Every type measured in both libraries trains the same number of parameters in each.")
    mem = [r for r in measured if r.get("mem_unipeft_over_peft") is not None]
    if mem:
        worst = max(mem, key=lambda r: r["mem_unipeft_over_peft"])
        out.append(f"Peak memory unipeft / PEFT over {len(mem)} type(s): median "
                   f"{sorted(r['mem_unipeft_over_peft'] for r in mem)[len(mem) // 2]:.2f}, highest {worst['method']} "
                   f"({worst['mem_unipeft_over_peft']:.2f}).")
    if res.get("types_without_spec"):
        out.append("Registered PEFT types without a size spec here (run at PEFT's defaults): "
                   + ", ".join(res["types_without_spec"]) + ".")
    return out


def markdown(res: dict) -> str:
    """The table, then the findings, the not-applicable types with their reasons."""
    v = res["versions"]
    quick = " (quick run)" if res["quick"] else ""
    out = [f"# PEFT tuner types on MiniLM: unipeft vs PEFT, relative to LoRA r=8{quick}",
           "", f"unipeft {v['unipeft']}, peft {v['peft']}, torch {v['torch']}, transformers {v['transformers']}, "
           f"{v['cpus']} CPUs, {res['torch_threads']} torch thread; load average at the end "
           f"{', '.join(f'{x:.2f}' for x in res['load_average'])}; run took {res['wall_seconds']} s.", "",
           f"Training step = zero_grad + forward + backward + AdamW step on batch {res['batch']} x {res['seq']} "
           f"tokens, task_type SEQ_CLS (the classifier head trains in both libraries and is left out of the "
           f"counts), targets {', '.join(res['targets'])} unless the type says otherwise. LoRA r=8 trains "
           f"{res['lora_params']:,} parameters. Times: median of {res['repeat']} interleaved rounds after "
           f"{res['warmup']} warm-up steps, each type in one group with both libraries' LoRA; brackets hold the "
           f"90% paired-bootstrap band (benchmarks/stats.py). Verdict: faster / slower = the whole band of "
           f"unipeft / PEFT is below / above 1, else within noise. Peak MB: RSS high-water mark above the "
           f"loaded model over {res['memory_steps']} step(s) in a fresh process, one run each"
           f"{' (memory children: ' + res['memory'] + ')' if res['memory'] != 'all' else ''}.", "",
           "## Findings", ""] + [f"- {f}" for f in _findings(res)] + ["",
           "## Measured types", "",
           "| method | PEFT type | size | params unipeft / peft (x LoRA) | step s unipeft / peft | unipeft / PEFT "
           "time | verdict | unipeft / its LoRA | PEFT / its LoRA | peak MB unipeft / peft | mem unipeft / PEFT "
           "| mem / LoRA unipeft / peft | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [_row(r) for r in res["rows"] if r["status"] == "measured"]
    notes = [r for r in res["rows"] if r.get("note")]
    if notes:
        out += [""] + [f"- {r['method']}: {r['note']}." for r in notes]
    failed = [r for r in res["rows"] if r["status"] == "failed"]
    if failed:
        out += ["", "## Failed in both libraries", "", "| method | PEFT type | errors |", "|---|---|---|"]
        out += [f"| {r['method']} | {r['peft_type']} | " + "; ".join(
            f"{k}: {e[:200]}" for k, e in r["errors"].items()).replace("|", "/").replace("\n", " ") + " |"
            for r in failed]
    na = [r for r in res["rows"] if r["status"] == "not applicable"]
    if na:
        out += ["", "## Not applicable to an encoder (MiniLM)", "",
                "| method | PEFT type | reason | unipeft says | PEFT says |", "|---|---|---|---|---|"]
        out += [f"| {r['method']} | {r['peft_type']} | {r['reason']} | "
                f"{r['errors']['unipeft'][:200]} | {r['errors']['peft'][:200]} |".replace("\n", " ") for r in na]
    return "\n".join(out) + "\n"


def _banded(ax, names: list[str], figs: dict[str, list[dict | None]], title: str) -> None:
    """Bars of ratios with their (asymmetric) 90% bands as error bars, at the positions plots.bars uses."""
    from .plots import bars

    bars(ax, names, {k: [f["ratio"] if f else None for f in v] for k, v in figs.items()}, title=title,
         ylabel="ratio", rotate=True)
    width = 0.8 / max(1, len(figs))
    for k, v in enumerate(figs.values()):
        pts = [(i + (k - (len(figs) - 1) / 2) * width, f) for i, f in enumerate(v) if f]
        if pts:
            ax.errorbar([x for x, _ in pts], [f["ratio"] for _, f in pts], fmt="none", ecolor="k", capsize=3,
                        elinewidth=1.0, yerr=[[f["ratio"] - min(f["band"]) for _, f in pts],
                                              [max(f["band"]) - f["ratio"] for _, f in pts]])
    ax.axhline(1.0, color="k", lw=0.8)


def plot(res: dict, path) -> None:
    """Three panels over the measured types: unipeft / PEFT time with its band, time and memory relative to
    each library's LoRA."""
    from .plots import bars, panels, save

    rows = [r for r in res["rows"] if r["status"] == "measured"]
    names = [r["method"] for r in rows]
    fig, axes = panels(3, "PEFT tuner types on MiniLM: unipeft vs PEFT", cols=1,
                       size=(max(6.0, 0.45 * len(rows) + 3), 3.6))
    _banded(axes[0], names, {"unipeft / PEFT": [r.get("unipeft_over_peft") for r in rows]},
            "step time unipeft / PEFT (1 = same; error bar = 90% band)")
    _banded(axes[1], names, {lib: [r.get(f"{lib}_over_lora") for r in rows] for lib in ("unipeft", "peft")},
            "step time / the same library's LoRA r=8 (error bar = 90% band)")
    bars(axes[2], names, {lib: [(r.get("mem_over_lora") or {}).get(lib) for r in rows] for lib in ("unipeft", "peft")},
         title="peak memory / the same library's LoRA r=8 (one child each)", ylabel="ratio", rotate=True)
    save(fig, path)
