"""Markdown rendering of a benchmark payload (ratios first; raw seconds stay in the JSON)."""
from __future__ import annotations


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown(payload: dict) -> str:
    """One table per row kind; every figure a ratio measured in the same run."""
    v = payload["versions"]
    out = [f"# unipeft vs peft ({payload['suite']} suite)", "",
           f"unipeft {v['unipeft']}, peft {v['peft']}, torch {v['torch']}, transformers {v['transformers']}, "
           f"{v['cpus']} CPUs, {v['torch_threads']} torch threads; run took {payload['wall_seconds']} s.", ""]
    rows = payload["rows"]
    train = [r for r in rows if r["row"] == "train_step"]
    if train:
        out += ["## Training step (time relative to the bound: frozen model, backward to the input embeddings)", "",
                "| model | method | unipeft / bound | peft / bound | unipeft / peft (time) | peak MB unipeft / peft / bound |",
                "|---|---|---|---|---|---|"]
        for r in train:
            mem = r.get("peak_mb")
            mem_s = f"{mem['unipeft']} / {mem['peft']} / {mem['bound']}" if mem else "-"
            out.append(f"| {r['model']} | {r['method']} | {_r(r['unipeft_over_bound'])} | {_r(r['peft_over_bound'])} "
                       f"| {_r(r['unipeft_over_peft'])} | {mem_s} |")
        out.append("")
    inf = [r for r in rows if r["row"] == "inference_overhead"]
    if inf:
        out += ["## Unmerged LoRA inference overhead over the base model", "",
                "| model | batch | unipeft overhead | peft overhead | unipeft / peft |", "|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | {100 * r['overhead']['unipeft']:.1f}% | "
                f"{100 * r['overhead']['peft']:.1f}% | {_r(r['unipeft_overhead_over_peft'])} |" for r in inf]
        out.append("")
    mixed = [r for r in rows if r["row"] == "mixed_batch"]
    if mixed:
        out += ["## Mixed-adapter batches", "",
                "| model | batch | adapters | unipeft throughput / peft | unipeft mixed / single (time) | peft mixed / single "
                "| mixing cost unipeft / peft |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['model']} | {r['batch']} | {r['adapters']} | {_r(r['unipeft_throughput_over_peft'])} | "
                f"{_r(r['unipeft_mixed_over_single'])} | {_r(r['peft_mixed_over_single'])} | "
                f"{_r(r.get('unipeft_mixing_cost_over_peft'))} |" for r in mixed]
        out.append("")
    inj = [r for r in rows if r["row"] == "inject_load"]
    if inj:
        out += ["## Injecting and loading the k-th adapter", "",
                "| model | marks | unipeft last/first inject, load | peft last/first inject, load | unipeft / peft at last inject, load |",
                "|---|---|---|---|---|"]
        for r in inj:
            u, p, q = r["unipeft_last_over_first"], r["peft_last_over_first"], r["unipeft_over_peft_at_last"]
            out.append(f"| {r['model']} | {r['marks']} | {_r(u['inject'])}, {_r(u['load'])} | {_r(p['inject'])}, "
                       f"{_r(p['load'])} | {_r(q['inject'])}, {_r(q['load'])} |")
        out.append("")
    merge = [r for r in rows if r["row"] == "merge"]
    if merge:
        out += ["## merge_and_unload", "", "| model | unipeft / peft (time) | max |merged - unmerged| unipeft, peft |",
                "|---|---|---|"]
        out += [f"| {r['model']} | {_r(r['unipeft_over_peft'])} | {r['max_abs_deviation']['unipeft']:.1e}, "
                f"{r['max_abs_deviation']['peft']:.1e} |" for r in merge]
        out.append("")
    out += targets(rows)
    if payload.get("findings"):
        out += ["## Profiling findings", ""] + [f"- {f}" for f in payload["findings"]]
    return "\n".join(out)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with the figure it is judged on."""
    out = ["## Targets", "", "| target | figure | verdict |", "|---|---|---|"]
    for r in rows:
        if r["row"] == "train_step":
            x = r["unipeft_over_peft"]
            out.append(f"| {r['model']} {r['method']} training step no slower than peft | time ratio {x:.2f} "
                       f"| {_verdict(x <= 1.0)}{' (within 5%)' if 1.0 < x <= 1.05 else ''} |")
        elif r["row"] == "inference_overhead":
            x = r["unipeft_overhead_over_peft"]
            out.append(f"| {r['model']} batch {r['batch']} unmerged overhead <= half of peft's | "
                       f"{100 * r['overhead']['unipeft']:.1f}% vs {100 * r['overhead']['peft']:.1f}% "
                       f"| {_verdict(None if x is None else x <= 0.5)} |")
        elif r["row"] == "mixed_batch":
            x = r["unipeft_throughput_over_peft"]
            out.append(f"| {r['model']} mixed-batch throughput >= 2x peft | {x:.2f}x | {_verdict(x >= 2.0)} |")
        elif r["row"] == "inject_load":
            u = r["unipeft_last_over_first"]
            ok = max(u["inject"], u["load"]) <= 1.25  # single-shot timings of ~ms operations: 25% noise band
            out.append(f"| {r['model']} k-th adapter injects/loads as fast as the first | last/first "
                       f"{u['inject']:.2f}, {u['load']:.2f} | {_verdict(ok)} |")
    return out
