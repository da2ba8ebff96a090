"""torch.compile on the unipeft-adapted model (LoRA q,v) vs the same model eager: one training step and one
batch-1 forward, side by side. A compile that fails is recorded with its error text, not raised."""
from __future__ import annotations

import statistics
import time

import torch

from .common import interleaved_samples
from .models import batch
from .peft_suite import _trained_like, adapted, error_text, train_step
from .stats import compare


def _graph_breaks() -> dict:
    """Dynamo's graph-break count and its most frequent reasons since the last reset."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    top = sorted(breaks.items(), key=lambda kv: -kv[1])[:5]
    return {"count": int(sum(breaks.values())), "top_reasons": [{"reason": str(k)[:300], "count": int(v)}
                                                                 for k, v in top]}


def _compiled(fn_of_model, model: torch.nn.Module, backend: str):
    """(compiled closure, seconds of its first call, graph breaks) or raise what compiling raised."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graph breaks of this compile only
    fn = fn_of_model(torch.compile(model, backend=backend))
    t0 = time.perf_counter()
    fn()  # the first call traces and compiles
    return fn, time.perf_counter() - t0, _graph_breaks()


def compile_rows(model: str, size: int, seq: int, repeat: int, backend: str = "inductor") -> list[dict]:
    """Eager / compiled time of a LoRA q,v training step (batch size x seq) and of a batch-1 forward."""
    rows = []
    train_batch, infer_batch = batch(model, size, seq), batch(model, 1, seq)

    def infer(m):
        def fwd():
            with torch.inference_mode():
                m(**infer_batch)
        return fwd

    cases = (("train_step", size, lambda: adapted("unipeft", model, "lora_qv").train(),
              lambda m: train_step(m, train_batch)),
             ("inference", 1, lambda: _trained_like(adapted("unipeft", model, "lora_qv")).eval(), infer))
    for kind, bsz, make, fn_of_model in cases:
        row = {"row": "compile", "model": model, "kind": kind, "batch": bsz, "seq": seq, "backend": backend,
               "method": "lora_qv", "torch": torch.__version__}
        eager = fn_of_model(make())
        try:
            compiled, first, breaks = _compiled(fn_of_model, make(), backend)
        except Exception as exc:  # noqa: BLE001 - recorded: another engineer is making adapted models compile
            row.update(error=error_text(exc), graph_breaks=_graph_breaks())
            rows.append(row)
            continue
        try:
            s = interleaved_samples({"eager": eager, "compiled": compiled}, repeat)
        except Exception as exc:  # noqa: BLE001 - e.g. a recompile that fails on a later call
            row.update(error=error_text(exc), first_call_seconds=first, graph_breaks=breaks)
            rows.append(row)
            continue
        row.update(first_call_seconds=first, graph_breaks=breaks, samples=s,
                   seconds={k: statistics.median(v) for k, v in s.items()},
                   eager_over_compiled=compare(s["eager"], s["compiled"]))  # > 1: compiling speeds it up
        rows.append(row)
    torch._dynamo.reset()
    return rows
