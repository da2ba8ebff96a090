"""The issue's performance targets, each judged on a ratio measured side by side in one run, with its band.

Every target reads one figure of the rows (a `compare` dict: ratio, band) and is "met", "within noise"
or "missed" by `stats.verdict`. Targets are judged on the suite's main model (MiniLM for quick/full);
time to accuracy comes from benchmarks/time_to_accuracy.py's JSON when it is present.
"""
from __future__ import annotations

import json
from pathlib import Path

from .stats import MET, MISSED, NOISE, verdict

# (id, what is claimed, row kind, row selector, figure key, threshold); every direction is "<=".
SPECS = [
    ("lora_all_linear_vs_bound", "LoRA all-linear training step <= 1.10x the bound", "train_step",
     {"method": "lora_all_linear"}, "unipeft_over_bound", 1.10),
    ("lora_all_linear_vs_peft", "LoRA all-linear training step <= 0.85x peft", "train_step",
     {"method": "lora_all_linear"}, "unipeft_over_peft", 0.85),
    ("lora_qv_vs_bound", "LoRA q,v training step <= 1.05x the bound", "train_step", {"method": "lora_qv"},
     "unipeft_over_bound", 1.05),
    ("dora_vs_lora_qv", "DoRA training step <= 1.3x unipeft's LoRA (q,v both)", "train_step", {"method": "dora"},
     "unipeft_over_unipeft_lora_qv", 1.30),
    ("ia3_vs_peft", "IA3 training step no slower than peft", "train_step", {"method": "ia3"},
     "unipeft_over_peft", 1.0),
    ("prompt_tuning_vs_peft", "prompt tuning training step no slower than peft", "train_step",
     {"method": "prompt_tuning"}, "unipeft_over_peft", 1.0),
    ("prefix_tuning_vs_peft", "prefix tuning training step no slower than peft", "train_step",
     {"method": "prefix_tuning"}, "unipeft_over_peft", 1.0),
    ("inference_overhead_batch1", "unmerged LoRA inference overhead <= 5% at batch 1", "inference_overhead",
     {"batch": 1}, "unipeft_over_base", 1.05),
    ("inference_overhead_batch16", "unmerged LoRA inference overhead <= 5% at batch 16", "inference_overhead",
     {"batch": 16}, "unipeft_over_base", 1.05),
    ("mixed_batch_vs_base", "mixed batch (each row its own adapter) <= 1.10x the base model alone",
     "mixed_batch", {}, "unipeft_mixed_over_base", 1.10),
]
TTA_TARGET = ("time_to_accuracy_vs_peft", "time to PEFT + Trainer's final test accuracy <= 0.5x PEFT's "
              "training time", 0.5)


def _entry(tid: str, claim: str, threshold: float, fig: dict | None, **extra) -> dict:
    if fig is None or fig.get("ratio") is None:
        return {"id": tid, "target": claim, "threshold": threshold, "direction": "<=", "ratio": None, "band": None,
                "verdict": MISSED, **extra}
    return {"id": tid, "target": claim, "threshold": threshold, "direction": "<=", "ratio": fig["ratio"],
            "band": list(fig["band"]), "verdict": verdict(fig["band"], threshold), **extra}


def judge(rows: list[dict], model: str, tta: dict | None = None) -> tuple[list[dict], list[str]]:
    """(target entries, ids not measured in this run) for `model`'s rows and an optional time-to-accuracy result."""
    entries, missing = [], []
    for tid, claim, kind, select, key, threshold in SPECS:
        row = next((r for r in rows if r["row"] == kind and r["model"] == model
                    and all(r.get(k) == v for k, v in select.items())), None)
        if row is None:
            missing.append(tid)
            continue
        errors = row.get("errors") or {}
        extra = {"model": model, "figure": key, "error": "; ".join(f"{k}: {v}" for k, v in errors.items())} \
            if errors and key not in row else {"model": model, "figure": key}
        entries.append(_entry(tid, claim, threshold, row.get(key), **extra))
    tid, claim, threshold = TTA_TARGET
    if tta and tta.get("time_to_accuracy"):
        t = tta["time_to_accuracy"]
        entries.append(_entry(tid, claim, threshold, {"ratio": t.get("ratio"), "band": t.get("band")},
                              model=tta.get("model", "minilm"), figure="time_to_accuracy.ratio",
                              source=tta.get("source", "time_to_accuracy.json"), band_kind=t.get("band_kind")))
    else:
        missing.append(tid)
    return entries, missing


def load_tta(path: Path) -> dict | None:
    """benchmarks/time_to_accuracy.py's JSON, or None when it has not been run."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["source"] = str(path.name)
    return data


def _xerr(x: float, lo: float, hi: float) -> list[list[float]]:
    """Error-bar lengths of the band around x (a bootstrap band need not contain the point exactly)."""
    return [[max(0.0, x - lo)], [max(0.0, hi - x)]]


COLOURS = {MET: "tab:green", NOISE: "tab:orange", MISSED: "tab:red"}


def plot(entries: list[dict], compile_rows: list[dict], path: Path, title: str = "") -> Path:
    """Ratios (point) with their bands (bar) against each target (red tick); compile speed-ups on the right."""
    from .plots import new_figure, save

    n = max(len(entries), 1)
    fig = new_figure(13.0, 0.45 * n + 1.8, title)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 1])
    for y, e in enumerate(reversed(entries)):
        ax.plot([e["threshold"]], [y], marker="|", markersize=16, color="red", mew=2)
        if e["ratio"] is None:
            ax.annotate("no figure (error)", (e["threshold"], y), xytext=(6, -3), textcoords="offset points",
                        fontsize="x-small", color="red")
            continue
        lo, hi = e["band"]
        ax.errorbar([e["ratio"]], [y], xerr=_xerr(e["ratio"], lo, hi), fmt="o", capsize=4,
                    color=COLOURS[e["verdict"]])
        ax.annotate(f"{e['ratio']:.3f} [{lo:.3f}, {hi:.3f}] {e['verdict']}", (hi, y), xytext=(6, -3),
                    textcoords="offset points", fontsize="x-small")
    ax.set_yticks(range(len(entries)), [e["target"] for e in reversed(entries)], fontsize="x-small")
    tta = any(e["id"] == TTA_TARGET[0] for e in entries)
    ax.set_xlabel("ratio (point: ratio of medians; bar: 90% paired-bootstrap band; red tick: target)"
                  + ("\ntime to accuracy: bar = the evaluation interval in which the crossing lies" if tta else ""))
    ends = [x for e in entries if e["ratio"] is not None for x in e["band"]] + [e["threshold"] for e in entries]
    if ends:  # room on the right for the annotations
        ax.set_xlim(max(0.0, min(ends) - 0.1), max(ends) + 0.45 * (max(ends) - max(0.0, min(ends) - 0.1)) + 0.05)
    ax.grid(True, axis="x", alpha=0.3)
    ok = [r for r in compile_rows if "eager_over_compiled" in r]
    for y, r in enumerate(ok):
        c = r["eager_over_compiled"]
        ax2.errorbar([c["ratio"]], [y], xerr=_xerr(c["ratio"], *c["band"]), fmt="o", capsize=4, color="tab:blue")
    ax2.axvline(1.0, color="grey", lw=1)
    labels = [f"{r['kind']}\nbatch {r['batch']}" for r in ok]
    failed = [r for r in compile_rows if "error" in r]
    ax2.set_yticks(range(len(ok)), labels, fontsize="x-small")
    ax2.set_ylim(-1, max(len(ok), 1))
    ax2.margins(x=0.2)
    ax2.set_xlabel("eager / compiled time\n(> 1: compiled is faster)", fontsize="small")
    ax2.set_title("torch.compile" + (f" ({len(failed)} failed: see JSON)" if failed else ""), fontsize="small")
    ax2.grid(True, axis="x", alpha=0.3)
    return save(fig, path)
