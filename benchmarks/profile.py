"""torch.profiler pass over the training rows (unipeft, peft, the bound) and the batch-1 inference row,
and the findings: sentences computed from those op tables, so every number in them is from this run.

A table is per step: {"steps", "wall_ms_per_step", "op_ms_per_step", "outside_ops_ms_per_step",
"ops": [{"op", "self_ms", "pct_of_step", "calls"}, ...], "small_ops"} with ops sorted by self CPU time
(the findings read only the stored ops, so each of their figures can be checked in the JSON); "% of
step" is the op's self CPU time over the profiled wall time of one step. Profiled times include
the profiler's own per-op cost, so they run above the timing rows' medians (the findings say by
how much for the bound).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

DROPOUT_OPS = ("aten::bernoulli_", "aten::native_dropout", "aten::dropout")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
TOP_DIFFERENCES = 3
MIN_PCT = 0.05  # ops below this share of the step are summed, not listed, in the stored tables


def profile_fn(fn: Callable[[], object], steps: int = 3, warmup: int = 1) -> dict:
    """Op table of `steps` calls of fn (after `warmup` unprofiled calls), per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    return table_from_events([(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()],
                             steps, wall)


def table_from_events(events: list[tuple[str, float, int]], steps: int, wall_ms_per_step: float,
                      min_pct: float = MIN_PCT) -> dict:
    """A per-step table from (op name, total self CPU ms, total calls) over `steps` steps; ops under
    `min_pct` % of the step are summed into `small_ops` (except the dropout and matmul ops the findings name)."""
    ops = sorted(({"op": name, "self_ms": ms / steps, "pct_of_step": 100 * ms / steps / wall_ms_per_step,
                   "calls": count / steps} for name, ms, count in events if count), key=lambda r: -r["self_ms"])
    op_ms = sum(r["self_ms"] for r in ops)
    kept = [r for r in ops if r["pct_of_step"] >= min_pct or r["op"] in DROPOUT_OPS + MATMUL_OPS]
    small = [r for r in ops if r not in kept]
    return {"steps": steps, "wall_ms_per_step": wall_ms_per_step, "op_ms_per_step": op_ms,
            "outside_ops_ms_per_step": wall_ms_per_step - op_ms, "ops": kept,
            "small_ops": {"count": len(small), "self_ms": sum(r["self_ms"] for r in small), "under_pct": min_pct}}


def profile_training(model: str, size: int, seq: int, methods: tuple[str, ...], steps: int = 3) -> dict:
    """{'bound' | '<lib>/<method>': table} for the training step of every row (fresh models, same batch)."""
    from .models import batch
    from .peft_suite import training_steps

    fns, errors = training_steps(model, batch(model, size, seq), methods)
    out = {key: profile_fn(fn, steps) for key, fn in fns.items()}
    out.update({key: {"error": err} for key, err in errors.items()})
    return out


def profile_inference(model: str, seq: int, steps: int = 5) -> dict:
    """{'base' | 'unipeft' | 'peft': table} of one batch-1 forward (unmerged LoRA q,v) in inference mode."""
    from .models import batch
    from .peft_suite import inference_models

    b = batch(model, 1, seq)
    out = {}
    for key, m in inference_models(model).items():
        def fwd(m=m):
            with torch.inference_mode():
                m(**b)
        out[key] = profile_fn(fwd, steps, warmup=2)
    return out


# ---- findings: every figure comes from the tables passed in ------------------------------------------------
def _op(table: dict, name: str) -> dict:
    return next((r for r in table["ops"] if r["op"] == name), {"op": name, "self_ms": 0.0, "calls": 0.0})


def _sum(table: dict, names: tuple[str, ...]) -> tuple[float, float]:
    """(self ms, calls) per step of the named ops together."""
    rows = [_op(table, n) for n in names]
    return sum(r["self_ms"] for r in rows), sum(r["calls"] for r in rows)


def _pct(ms: float, of: float) -> str:
    return f"{100 * ms / of:.1f}%"


def _differences(a: dict, b: dict, n: int = TOP_DIFFERENCES, positive_only: bool = False) -> str:
    """The n ops whose per-step self time differs most between tables a and b, as '+1.23 ms (+12 calls) aten::mm'."""
    names = {r["op"] for r in a["ops"]} | {r["op"] for r in b["ops"]}
    diffs = [(name, _op(a, name)["self_ms"] - _op(b, name)["self_ms"], _op(a, name)["calls"] - _op(b, name)["calls"])
             for name in names]
    diffs = [d for d in diffs if d[1] > 0] if positive_only else diffs
    diffs.sort(key=lambda d: -abs(d[1]))
    return ", ".join(f"{name} {ms:+.2f} ms ({calls:+g} calls)" for name, ms, calls in diffs[:n]) or "none"


def bound_findings(model: str, bound: dict, timed_ms: float | None = None) -> list[str]:
    """Dropout's share of the bound's step, and how much profiling inflated it."""
    out = []
    wall = bound["wall_ms_per_step"]
    present = [r for r in (_op(bound, n) for n in DROPOUT_OPS) if r["calls"]]
    if present:
        parts = ", ".join(f"{r['op']} {r['self_ms']:.2f} ms = {_pct(r['self_ms'], wall)}" for r in present)
        total = sum(r["self_ms"] for r in present)
        out.append(f"{model}: dropout in the bound's step (frozen model in train mode, {wall:.2f} ms per profiled "
                   f"step): {parts}; together {total:.2f} ms = {_pct(total, wall)} of the bound's step.")
    else:
        out.append(f"{model}: no dropout op ({', '.join(DROPOUT_OPS)}) appears in the bound's profile "
                   f"({wall:.2f} ms per step).")
    if timed_ms:
        out.append(f"{model}: profiling inflates the bound's step from {timed_ms:.2f} ms (median of the timing "
                   f"rows) to {wall:.2f} ms ({wall / timed_ms:.2f}x); the op tables compare runs under the same "
                   f"inflation, the ratios of the timing rows are the figures judged against targets.")
    return out


def training_findings(model: str, method: str, ours: dict, theirs: dict | None, bound: dict) -> list[str]:
    """Where unipeft's step goes beyond the bound (matmul calls, largest excess ops) and how it differs from peft's."""
    wb, wu = bound["wall_ms_per_step"], ours["wall_ms_per_step"]
    (mm_u, calls_u), (mm_b, calls_b) = _sum(ours, MATMUL_OPS), _sum(bound, MATMUL_OPS)
    out = [f"{model} {method}: unipeft's profiled step is {wu:.2f} ms vs the bound's {wb:.2f} ms "
           f"({wu - wb:+.2f} ms = {_pct(wu - wb, wb)} of the bound); its largest excess ops: "
           f"{_differences(ours, bound, positive_only=True)}.",
           f"{model} {method}: unipeft makes {calls_u - calls_b:+g} matmul calls per step over the bound "
           f"({calls_u:g} vs {calls_b:g}; {', '.join(MATMUL_OPS)}); their self time differs by {mm_u - mm_b:+.2f} ms "
           f"per step = {_pct(mm_u - mm_b, wb)} of the bound's step; time outside profiled ops "
           f"{ours['outside_ops_ms_per_step']:.2f} ms vs the bound's {bound['outside_ops_ms_per_step']:.2f} ms."]
    if theirs is not None:
        wp = theirs["wall_ms_per_step"]
        out.append(f"{model} {method}: unipeft {wu:.2f} ms vs peft {wp:.2f} ms per profiled step ({wu / wp:.2f}x); "
                   f"the largest op differences (unipeft minus peft): {_differences(ours, theirs)}; time outside "
                   f"profiled ops {ours['outside_ops_ms_per_step']:.2f} vs {theirs['outside_ops_ms_per_step']:.2f} ms.")
    return out


def inference_findings(model: str, tables: dict) -> list[str]:
    """The cost of unmerged LoRA at batch 1 over the base forward, in matmul calls and time outside ops."""
    base, ours = tables["base"], tables["unipeft"]
    wb, wu = base["wall_ms_per_step"], ours["wall_ms_per_step"]
    (mm_u, calls_u), (mm_b, calls_b) = _sum(ours, MATMUL_OPS), _sum(base, MATMUL_OPS)
    peft_part = ""
    if "wall_ms_per_step" in tables.get("peft", {}):
        wp = tables["peft"]["wall_ms_per_step"]
        peft_part = f", peft {wp:.2f} ms ({_pct(wp - wb, wb)} over the base)"
    return [f"{model} batch-1 unmerged LoRA q,v: unipeft {wu:.2f} ms per profiled forward vs the base's {wb:.2f} ms "
            f"({_pct(wu - wb, wb)} over){peft_part}; unipeft adds {calls_u - calls_b:+g} matmul calls "
            f"({calls_u:g} vs {calls_b:g}) whose self time is {mm_u - mm_b:+.2f} ms = {_pct(mm_u - mm_b, wb)} of the "
            f"base forward; time outside profiled ops {ours['outside_ops_ms_per_step']:.2f} vs "
            f"{base['outside_ops_ms_per_step']:.2f} ms; the largest excess ops: "
            f"{_differences(ours, base, positive_only=True)}."]


def findings(model: str, profiles: dict, timed_bound_s: float | None = None) -> list[str]:
    """Every finding sentence for one model's profiles ({'train_step': {...}, 'inference_batch1': {...}})."""
    train = profiles.get("train_step", {})
    out: list[str] = []
    bound = train.get("bound")
    if bound and "error" not in bound:
        out += bound_findings(model, bound, None if timed_bound_s is None else 1e3 * timed_bound_s)
        methods = dict.fromkeys(k.split("/", 1)[1] for k in train if "/" in k)
        for method in methods:
            ours, theirs = train.get(f"unipeft/{method}"), train.get(f"peft/{method}")
            if ours is None or "error" in ours:
                out.append(f"{model} {method}: unipeft could not be profiled ({(ours or {}).get('error')}).")
                continue
            ok = theirs is not None and "error" not in theirs
            out += training_findings(model, method, ours, theirs if ok else None, bound)
    inf = profiles.get("inference_batch1")
    if inf and all("wall_ms_per_step" in inf.get(k, {}) for k in ("base", "unipeft")):
        out += inference_findings(model, inf)
    return out


def top_ops(table: dict, n: int = 8) -> list[dict]:
    """The n ops with the most self CPU time (for the markdown tables)."""
    return table["ops"][:n]
