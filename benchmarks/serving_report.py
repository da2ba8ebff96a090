"""The serving benchmark's answer checks, targets, markdown table, findings and figure (benchmarks/serving.py)."""
from __future__ import annotations

import statistics
from pathlib import Path

from .plots import bars, panels, save
from .stats import compare, verdict

LABELS = {"server": "unipeft serve, mixed adapters", "base": "unipeft serve, base only", "naive": "PEFT naive loop"}
GOALS = (("server", "naive", 5.0), ("server", "base", 0.8))


def check(m: dict) -> dict:
    """Outcome counts over every round, and the sampled answers that differ from the merged reference."""
    counts = {"requests": 0, "ok": 0, "lost": 0, "failed": 0, "ill-formed": 0}
    wrong, inconsistent, naive_wrong = [], 0, 0
    for kind, adapter_of in (("server", lambda r: r["adapter"]), ("base", lambda r: None)):
        first = m["rounds"][kind][0]["texts"]
        for k, rnd in enumerate(m["rounds"][kind]):
            counts["requests"] += len(rnd["texts"])
            for c, v in rnd["counts"].items():
                counts[c] += v
            inconsistent += sum(x != y for x, y in zip(rnd["texts"], first))
            for req in m["checked"]:
                want, got = m["refs"][(adapter_of(req), req["i"])], rnd["texts"][req["i"]]
                if got != want:
                    wrong.append({"kind": kind, "round": k, "request": req["i"], "adapter": adapter_of(req),
                                  "got": got, "expected": want})
    for rnd in m["rounds"]["naive"]:
        naive_wrong += sum(rnd["texts"][r["i"]] != m["refs"][(r["adapter"], r["i"])] for r in m["checked"])
    return {**counts, "checked_per_round": len(m["checked"]), "wrong": len(wrong), "wrong_examples": wrong[:5],
            "inconsistent_across_rounds": inconsistent, "naive_peft_differs_from_merged": naive_wrong}


def targets(res: dict) -> list[dict]:
    """Each target with its measured value, 90% band over the rounds and the verdict judged on the band."""
    s = res["systems"]
    out = []
    for a, b, goal in GOALS:
        c = compare(s[a]["tokens_per_s"], s[b]["tokens_per_s"])
        out.append({"target": f"tokens/s, {LABELS[a]} / {LABELS[b]}", "value": c["ratio"], "band": c["band"],
                    "goal": f">= {goal}", "verdict": verdict(c["band"], goal, ">="),
                    "note": f"{c['repeats']} alternating rounds, per-round ratios "
                            f"{c['per_round_min_max'][0]:.2f}..{c['per_round_min_max'][1]:.2f}"})
    ch = res["checks"]
    bad = ch["lost"] + ch["failed"] + ch["ill-formed"]
    out.append({"target": "lost, failed or ill-formed responses", "value": bad, "band": None, "goal": "== 0",
                "verdict": "met" if bad == 0 else "missed",
                "note": f"of {ch['requests']} server requests (lost {ch['lost']}, failed {ch['failed']}, "
                        f"ill-formed {ch['ill-formed']})"})
    out.append({"target": "wrong responses (greedy text != merged offline generation)", "value": ch["wrong"],
                "band": None, "goal": "== 0", "verdict": "met" if ch["wrong"] == 0 else "missed",
                "note": f"{ch['checked_per_round']} sampled requests x {res['rounds']} rounds x (adapters, base); "
                        f"answers that changed between rounds: {ch['inconsistent_across_rounds']}"})
    return out


def _fmt(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def findings(res: dict) -> list[str]:
    """Sentences stating what the numbers show (nothing here is written in advance)."""
    s = res["systems"]
    med = {k: statistics.median(v["tokens_per_s"]) for k, v in s.items()}
    out = []
    for (a, b, goal), x in zip(GOALS, res["targets"]):  # targets() lists the ratio targets first, in GOALS order
        out.append(f"{LABELS[a]} generates {med[a]:.1f} tokens/s against {med[b]:.1f} for {LABELS[b]}: "
                   f"{x['value']:.2f}x (90% band {x['band'][0]:.2f}..{x['band'][1]:.2f}), target >= {goal}x "
                   f"{x['verdict']}.")
    out.append(f"With all {res['requests']} requests sent at once, the server answers in p50 "
               f"{s['server']['p50_s']:.2f} s / p99 {s['server']['p99_s']:.2f} s (base only: "
               f"{s['base']['p50_s']:.2f} / {s['base']['p99_s']:.2f} s); the naive loop finishes its median "
               f"request after {s['naive']['p50_s']:.2f} s and its last after {s['naive']['p99_s']:.2f} s (p99).")
    ch = res["checks"]
    out.append(f"{ch['ok']} of {ch['requests']} server responses were well-formed completions of "
               f"{res['max_tokens']} tokens; {ch['wrong']} of the sampled answers differed from the offline greedy "
               f"generation with the adapter merged; PEFT's unmerged naive loop differed on "
               f"{ch['naive_peft_differs_from_merged']}.")
    return out


def markdown(res: dict) -> str:
    """The results as markdown: set-up, throughput and latency table, targets, findings."""
    s = res["systems"]
    lines = [f"# Multi-adapter serving: {res['adapters']} LoRA adapters, {res['requests']} concurrent requests "
             f"({res['model']})", "",
             f"Generated by `{res['command']}` in {res['seconds']:.0f} s; {res['max_tokens']} greedy tokens per "
             f"request (min_tokens = max_tokens), {res['rounds']} rounds in rotating order, {res['threads']} "
             f"threads per process, server `--max-batch {res['max_batch']}`; versions in the JSON.", "",
             "| system | tokens/s (median) | per round | p50 latency s | p99 latency s |", "|---|---|---|---|---|"]
    for key, sysm in s.items():
        tps = sysm["tokens_per_s"]
        lines.append(f"| {LABELS[key]} | {statistics.median(tps):.1f} | {', '.join(f'{x:.1f}' for x in tps)} | "
                     f"{sysm['p50_s']:.3f} | {sysm['p99_s']:.3f} |")
    lines += ["", "Naive loop latency: time from the start of the round (all requests arrived) to each answer."]
    eng = res.get("server_metrics", {})
    if eng.get("unipeft_batch_size_count"):
        lines += ["", f"Server engine over the whole run (warm-up, adapter and base rounds): "
                      f"{eng['unipeft_batch_size_count']:.0f} forward steps, "
                      f"{eng['unipeft_batch_size_sum'] / eng['unipeft_batch_size_count']:.1f} rows per step on "
                      f"average, {eng.get('unipeft_engine_tokens_total', 0):.0f} tokens generated; server start-up "
                      f"{res['startup_seconds']:.1f} s."]
    lines += ["",
              "## Targets", "", "| target | value | 90% band | goal | verdict | note |", "|---|---|---|---|---|---|"]
    for t in res["targets"]:
        band = f"[{t['band'][0]:.3f}, {t['band'][1]:.3f}]" if t["band"] else "-"
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {band} | {t['goal']} | {t['verdict']} | {t['note']} |")
    lines += ["", "## Findings", ""] + [f"- {f}" for f in findings(res)]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Tokens/s bars (median, min..max over rounds) and p50/p99 latency bars."""
    s = res["systems"]
    fig, (tps, lat, cdf) = panels(3, f"Serving {res['adapters']} LoRA adapters, {res['requests']} requests "
                                     f"({res['model']})", cols=3)
    names = [LABELS[k] for k in s]
    med = [statistics.median(v["tokens_per_s"]) for v in s.values()]
    spread = [(max(v["tokens_per_s"]) - min(v["tokens_per_s"])) / 2 for v in s.values()]
    bars(tps, names, {"tokens/s": med}, errors={"tokens/s": spread}, title="throughput (median of rounds)",
         ylabel="generated tokens / s", rotate=True)
    bars(lat, names, {"p50": [v["p50_s"] for v in s.values()], "p99": [v["p99_s"] for v in s.values()]},
         title="latency, all requests sent at once", ylabel="seconds", rotate=True)
    for key, v in s.items():
        q = v["latency_quantiles"]
        cdf.plot(q, [i / (len(q) - 1) for i in range(len(q))], marker=".", label=LABELS[key])
    cdf.set(title="latency CDF", xlabel="seconds", ylabel="fraction of requests answered")
    cdf.legend(fontsize=8)
    cdf.grid(alpha=0.3)
    save(fig, path)
