"""Markdown rendering of a benchmark payload (ratios with their bands first; raw seconds stay in the JSON)."""
from __future__ import annotations

from .profile import top_ops


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def band(fig: dict | None, digits: int = 3) -> str:
    """'1.034 [1.010, 1.052]': ratio of medians and its 90% band."""
    if not fig:
        return "n/a"
    lo, hi = fig["band"]
    return f"{fig['ratio']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def overhead(fig: dict | None) -> str:
    """'+3.4% [+1.0%, +5.2%]': a time ratio over the base as a percentage overhead."""
    if not fig:
        return "n/a"
    lo, hi = fig["band"]
    return f"{100 * (fig['ratio'] - 1):+.1f}% [{100 * (lo - 1):+.1f}%, {100 * (hi - 1):+.1f}%]"


def _train(rows: list[dict]) -> list[str]:
    out = ["## Training step (time ratios; the bound is the frozen model in train mode, backward to the input "
           "embeddings)", "", "| model | method | batch x seq | unipeft / bound | peft / bound | unipeft / peft "
           "| peak MB unipeft / peft / bound | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("peak_mb")
        mem_s = " / ".join(str(mem.get(k, "-")) for k in ("unipeft", "peft", "bound")) if mem else "-"
        err = "; ".join(f"{k}: {v[:120]}" for k, v in (r.get("errors") or {}).items()) or "-"
        out.append(f"| {r['model']} | {r['method']} | {r['batch']} x {r['seq']} | {band(r.get('unipeft_over_bound'))} "
                   f"| {band(r.get('peft_over_bound'))} | {band(r.get('unipeft_over_peft'))} | {mem_s} | {err} |")
    dora = [r for r in rows if r.get("unipeft_over_unipeft_lora_qv")]
    out += [""] + [f"DoRA / LoRA q,v (unipeft, {r['model']}): {band(r['unipeft_over_unipeft_lora_qv'])}" for r in dora]
    return out + [""]


def _inference(rows: list[dict]) -> list[str]:
    out = ["## Unmerged LoRA q,v inference over the base model", "",
           "| model | batch x seq | unipeft overhead | peft overhead | unipeft / peft (time) |",
           "|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['batch']} x {r['seq']} | {overhead(r['unipeft_over_base'])} | "
            f"{overhead(r['peft_over_base'])} | {band(r['unipeft_over_peft'])} |" for r in rows]
    return out + [""]


def _mixed(rows: list[dict]) -> list[str]:
    out = ["## Mixed-adapter batches (each row names its adapter)", "",
           "| model | batch x seq | adapters (distinct in batch) | unipeft mixed / base | peft mixed / base "
           "| unipeft / peft (mixed) | unipeft mixed / one adapter |", "|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['batch']} x {r['seq']} | {r['adapters']} ({r['distinct_adapters_in_batch']}) | "
            f"{band(r['unipeft_mixed_over_base'])} | {band(r['peft_mixed_over_base'])} | "
            f"{band(r['unipeft_mixed_over_peft_mixed'])} | {band(r['unipeft_mixed_over_single'])} |" for r in rows]
    return out + [""]


def _inject(rows: list[dict]) -> list[str]:
    out = ["## Injecting and loading the k-th adapter (one timing per adapter; medians over windows of adapters)",
           "", "| model | ratio | unipeft inject, load | peft inject, load | unipeft / peft at the last window "
           "(inject, load) |", "|---|---|---|---|---|"]
    for r in rows:
        u, p, q = r["unipeft_last_over_first"], r["peft_last_over_first"], r["unipeft_over_peft_at_last"]
        out.append(f"| {r['model']} | {r['label']} | {_r(u['inject'])}, {_r(u['load'])} | {_r(p['inject'])}, "
                   f"{_r(p['load'])} | {_r(q['inject'])}, {_r(q['load'])} |")
    return out + [""]


def _merge(rows: list[dict]) -> list[str]:
    out = ["## merge_and_unload (one timing each)", "",
           "| model | unipeft / peft (time) | max abs(merged - unmerged) unipeft, peft |", "|---|---|---|"]
    out += [f"| {r['model']} | {_r(r['unipeft_over_peft'])} | {r['max_abs_deviation']['unipeft']:.1e}, "
            f"{r['max_abs_deviation']['peft']:.1e} |" for r in rows]
    return out + [""]


def _compile(rows: list[dict]) -> list[str]:
    out = ["## torch.compile vs eager (unipeft, LoRA q,v)", "",
           "| model | kind | batch x seq | backend | eager / compiled (> 1: faster compiled) | first call s "
           "| graph breaks | error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r.get("graph_breaks", {}).get("count", "-")
        err = r.get("error", "-").replace("\n", " ").replace("|", "/")[:300]
        first = f"{r['first_call_seconds']:.1f}" if "first_call_seconds" in r else "-"
        out.append(f"| {r['model']} | {r['kind']} | {r['batch']} x {r['seq']} | {r['backend']} | "
                   f"{band(r.get('eager_over_compiled'))} | {first} | {gb} | {err} |")
    return out + [""]


def targets_table(entries: list[dict], missing: list[str]) -> list[str]:
    """The targets with their figure, band and verdict."""
    out = ["## Targets", "", "Verdict: met = the whole 90% band is at or below the target; missed = the whole "
           "band is above it; within noise = the band straddles it.", "",
           "| target | model | ratio [90% band] | verdict |", "|---|---|---|---|"]
    for e in entries:
        fig = band({"ratio": e["ratio"], "band": e["band"]}) if e["ratio"] is not None else "n/a"
        note = f" ({e['error'][:200]})" if e.get("error") else ""
        src = f", from {e['source']}" if e.get("source") else ""
        out.append(f"| {e['target']} | {e.get('model', '')}{src} | {fig} | {e['verdict']}{note} |")
    if missing:
        out += ["", f"Not measured in this run: {', '.join(missing)}."]
    return out + [""]


def profile_tables(profiles: dict, n: int = 8) -> list[str]:
    """Top ops per profiled configuration: self CPU ms per step, % of the profiled step, calls per step."""
    out = ["## Profiles (torch.profiler, self CPU time per step; % of the profiled wall time of one step)", ""]
    for model, kinds in profiles.items():
        for kind, tables in kinds.items():
            for key, t in tables.items():
                if "error" in t:
                    out += [f"### {model} {kind} {key}: not profiled ({t['error'][:200]})", ""]
                    continue
                out += [f"### {model} {kind} {key}: {t['wall_ms_per_step']:.2f} ms per profiled step "
                        f"({t['outside_ops_ms_per_step']:.2f} ms outside profiled ops)", "",
                        "| op | self CPU ms / step | % of step | calls / step |", "|---|---|---|---|"]
                out += [f"| {o['op']} | {o['self_ms']:.3f} | {o['pct_of_step']:.1f} | {o['calls']:g} |"
                        for o in top_ops(t, n)]
                out.append("")
    return out


def markdown(payload: dict) -> str:
    """One table per row kind, the targets with verdicts, the profiles and the findings computed from them."""
    v = payload["versions"]
    th = payload.get("threads", {})
    out = [f"# unipeft vs peft ({payload['suite']} suite)", "",
           f"unipeft {v['unipeft']}, peft {v['peft']}, torch {v['torch']}, transformers {v['transformers']}, "
           f"{v['cpus']} CPUs, {v['torch_threads']} torch threads ({th.get('reason', '')}); run took "
           f"{payload['wall_seconds']} s; load average at start and end "
           f"{payload.get('load_average_at_start_and_end')}.", "",
           "Ratios are ratios of medians over interleaved repeats; brackets hold the 90% paired-bootstrap band "
           "(benchmarks/stats.py).", ""]
    if th.get("busy_warning"):
        out += [f"Machine busy at the start (1-minute load {th.get('load_1min')}): {th['busy_warning']}", ""]
    rows = payload["rows"]
    for kind, render in (("train_step", _train), ("inference_overhead", _inference), ("mixed_batch", _mixed),
                         ("inject_load", _inject), ("merge", _merge), ("compile", _compile)):
        chosen = [r for r in rows if r["row"] == kind]
        if chosen:
            out += render(chosen)
    out += targets_table(payload.get("targets", []), payload.get("targets_not_measured", []))
    if payload.get("findings"):
        out += ["## Findings (computed from the profiles below)", ""] + [f"- {f}" for f in payload["findings"]] + [""]
    if payload.get("profiles"):
        out += profile_tables(payload["profiles"])
    return "\n".join(out)
