"""Cost of every PEFT tuner type unipeft supports, unipeft's implementation vs PEFT's, relative to LoRA r=8.

    python -m benchmarks.peft_types_cost [--methods lora,ia3,...] [--repeat 12] [--warmup 2] [--steps 3]
                                         [--out PATH] [--quick]

The types are read from the registry: every public method with `peft_compatible` whose `peft_type` is
one of PEFT's PeftType values (one method per type, `method_for_peft_type`). Each is built from one set
of PEFT field names: PEFT's side as `peft.<peft_class>(**fields)`, ours through the unipeft.compat
factory of the same name, both with task_type SEQ_CLS (the classifier head trains in both) on the
offline MiniLM (benchmarks/models.py) and the target modules of examples/fortunes_lora.yaml.

Where a type has a size field (rank, frequencies, block size, tokens ...), the candidate values of
SPECS are counted (trainable parameters without the classifier head, on unipeft's model) and the one
nearest LoRA r=8's count in log scale is kept; the counts of both libraries are reported.

Per type, one interleaved group (common.interleaved_samples) times a training step (zero_grad,
forward, backward, AdamW step; batch 16 x 64 tokens, one torch thread) of unipeft/type, peft/type,
unipeft/LoRA and peft/LoRA, so drift hits all four; ratios are medians with the paired-bootstrap
band of benchmarks/stats.py. Peak memory is the RSS high-water mark of `--steps` training steps in a
fresh child process per (library, type) (benchmarks/memprobe.py's reset). Types that cannot run on an
encoder are listed with the reason and the error each library raises. peft_types_cost_report.py
turns the rows into the verdicts, the markdown and the PNG.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS, interleaved_samples, peak_rss_mb, versions
from .models import batch, build, loss_of
from .peft_suite import error_text, train_step
from .stats import compare

MODEL = "minilm"
TARGETS = ["query", "key", "value", "dense"]  # examples/fortunes_lora.yaml's LoRA targets
LORA = "lora"
HEAD = "classifier"  # the SEQ_CLS head both libraries train in full; left out of the adapter counts
EMBEDDING_ONLY = {"target_modules": None}  # prompt types take no target modules
NO_POOLER = ["query", "key", "value", "intermediate.dense", "output.dense"]  # TARGETS less bert.pooler.dense

# method -> (PEFT fields beyond target_modules/task_type, size field or None, candidate values of it).
# Quick runs take the first candidate; full runs the one whose count is nearest LoRA r=8's.
SPECS: dict[str, tuple[dict, str | None, tuple]] = {
    "lora": ({"r": 8, "lora_alpha": 16}, None, ()),
    "adalora": ({"init_r": 8, "target_r": 8, "lora_alpha": 16, "total_step": 1000}, None, ()),
    "adamss": ({"r": 64, "num_subspaces": 8}, "subspace_rank", (8, 10, 12)),
    "beft": ({}, None, ()),
    "boft": ({}, "boft_block_size", (4, 8, 16)),
    "c3a": ({}, "block_size", (24, 32, 48)),
    "deft": ({"r": 8}, None, ()),
    "delora": ({"r": 8}, None, ()),
    "fourierft": ({}, "n_frequency", (9000, 4500, 18000)),  # ~LoRA r=8's count / the 37 targeted linears
    "frod": ({"progressbar": False}, "sparse_rate", (0.01, 0.02, 0.05)),
    "glora": ({}, "r", (2, 3, 4)),
    "gralora": ({"alpha": 16, "gralora_k": 2}, "r", (8, 4, 16)),
    "hira": ({"r": 8}, None, ()),
    "hra": ({}, "r", (16, 8, 32)),
    "ia3": ({"feedforward_modules": ["dense"]}, None, ()),  # PEFT: a subset of target_modules as written
    "lily": ({"num_B": 2}, "r", (8, 12, 16)),
    "ln_tuning": ({"target_modules": ["LayerNorm"]}, None, ()),
    "loha": ({"r": 4, "alpha": 8}, None, ()),
    "lokr": ({"decompose_factor": 2}, "r", (16, 8, 24)),
    "miss": ({}, "r", (16, 8, 32)),
    "multitask_prompt_tuning": ({**EMBEDDING_ONLY, "num_tasks": 1}, "num_virtual_tokens", (16, 64, 256, 448)),
    "oft": ({}, "oft_block_size", (32, 64, 128)),
    "osf": ({}, "effective_rank", (320, 256, 360, 376)),
    "p_tuning": ({**EMBEDDING_ONLY, "num_virtual_tokens": 16}, "encoder_hidden_size", (64, 256, 320)),
    "peanut": ({"depth": 1}, "r", (8, 4, 16)),
    "peft_poly": ({"n_skills": 2, "n_tasks": 1, "target_modules": NO_POOLER}, "r", (4, 2, 8)),
    "prefix_tuning": ({**EMBEDDING_ONLY}, "num_virtual_tokens", (16, 64, 72)),  # 6 layers x 2 x 384 per token
    "prompt_tuning": ({**EMBEDDING_ONLY}, "num_virtual_tokens", (16, 64, 448)),  # 448 + 64 tokens = 512 positions
    "cartridge": ({**EMBEDDING_ONLY}, "num_virtual_tokens", (16, 64, 72)),
    "psoft": ({}, "r", (64, 128, 136)),
    "pvera": ({"save_projection": False}, "r", (256,)),
    "randlora": ({"save_projection": False}, "r", (32, 16)),
    "road": ({}, "variant", ("road_1", "road_2", "road_4")),
    "shira": ({"r": 8, "random_seed": 0}, None, ()),
    "supertuning": ({}, "sparsity", (0.97, 0.99, 0.95)),
    "tinylora": ({"save_projection": False}, "u", (64, 1024, 8192)),
    "trainable_tokens": ({"target_modules": ["word_embeddings"]}, "token_indices",
                         (tuple(range(128)), tuple(range(880)))),  # 384 parameters per token
    "unilora": ({}, "theta_d_length", (65536, 337920)),
    "vblora": ({"r": 4, "vector_length": 128, "topk": 2}, "num_vectors", (256, 512, 1024)),
    "vera": ({"save_projection": False}, "r", (256,)),
    "waveft": ({}, "n_frequency", (9000, 4500, 18000)),
    # Not applicable (below); tried with these fields so each library's refusal names the real obstacle.
    "adaption_prompt": ({**EMBEDDING_ONLY, "adapter_len": 10, "adapter_layers": 6}, None, ()),
    "cpt": ({**EMBEDDING_ONLY}, None, ()),
    "xlora": ({**EMBEDDING_ONLY, "hidden_size": 384, "adapters": {}}, None, ()),
    "shadow": ({}, None, ()),
}
# Types PEFT has that do not run on an encoder classifier; each is still tried, and both errors recorded.
NOT_APPLICABLE = {
    "adaption_prompt": "adapts the attention of Llama-family decoders (a fixed list of decoder model types)",
    "cpt": "context-aware prompt tuning is for causal language models (task_type CAUSAL_LM only)",
    "xlora": "mixes pretrained LoRA experts with a learned gate, on causal LMs; needs trained LoRA folders",
    "shadow": "a shadow network for decoder-only causal LMs (no SEQ_CLS head)",
}
NEEDS_TASK_IDS = {"peft_poly", "multitask_prompt_tuning"}
# Why a type's fields depart from the common targets (shown under the table).
NOTES = {"peft_poly": "targets without bert.pooler.dense: PEFT's Poly layer multiplies 3-D inputs only and raises "
                      "'batch1 must be a 3D tensor' on the pooler's (batch, hidden) input",
         "ln_tuning": "targets the LayerNorm modules (the type tunes norms, not linears)",
         "trainable_tokens": "targets the word embeddings (the type trains rows of an embedding)"}


def peft_types() -> dict[str, str]:
    """{method: peft_type} for every registered PEFT-compatible type PEFT's PeftType knows (one method each)."""
    from peft.utils.peft_types import PeftType

    import unipeft as up
    from unipeft.core.registry import method_for_peft_type

    known = {t.value for t in PeftType}
    types = sorted({r["peft_type"] for r in up.capability_table() if r["peft_compatible"] and r["peft_type"] in known})
    return {method_for_peft_type(t).name: t for t in types}


def peft_class(method: str) -> str:
    from unipeft.core.registry import get_method

    return get_method(method).config_cls.peft_class


def fields(method: str, value=None) -> dict:
    """PEFT field names for `method` (size field at `value`, default its first candidate)."""
    base, size, candidates = SPECS.get(method, ({}, None, ()))
    out = {"target_modules": list(TARGETS), "task_type": "SEQ_CLS", **copy.deepcopy(base)}
    if out["target_modules"] is None:
        del out["target_modules"]
    if size is not None:
        v = candidates[0] if value is None else value
        out[size] = list(v) if isinstance(v, tuple) else v
    return out


def make_model(lib: str, method: str, kw: dict, base: torch.nn.Module | None = None, seed: int = 0):
    """A fresh MiniLM (copy of `base` if given) adapted by `lib` with PEFT fields `kw`, in train mode."""
    import peft

    from unipeft import compat

    torch.manual_seed(seed)
    model = copy.deepcopy(base) if base is not None else build(MODEL, seed)
    name = peft_class(method)
    if lib == "peft":
        return peft.get_peft_model(model, getattr(peft, name)(**copy.deepcopy(kw))).train()
    return compat.get_peft_model(model, compat.config_factories()[name](**copy.deepcopy(kw))).train()


def adapter_params(model: torch.nn.Module) -> int:
    """Trainable parameters outside the classifier head."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and HEAD not in n)


def method_batch(method: str, size: int, seq: int) -> dict:
    b = batch(MODEL, size, seq)
    if method in NEEDS_TASK_IDS:
        b["task_ids"] = torch.zeros(size, dtype=torch.long)
    return b


def choose_size(method: str, base: torch.nn.Module, lora_count: int, quick: bool) -> dict:
    """The size value nearest LoRA's count (log scale) among the candidates, with every candidate's count."""
    _, size, candidates = SPECS.get(method, ({}, None, ()))
    if size is None:
        return {"field": None}
    counts, errors = {}, {}
    for v in candidates[:1] if quick else candidates:
        label = f"{len(v)} tokens" if isinstance(v, tuple) else str(v)
        try:
            counts[label] = (v, adapter_params(make_model("unipeft", method, fields(method, v), base)))
        except Exception as exc:  # noqa: BLE001 - a candidate our side rejects is skipped and recorded
            errors[label] = error_text(exc)
    if not counts:
        return {"field": size, "value": candidates[0], "label": str(candidates[0]), "candidate_errors": errors}
    label = min(counts, key=lambda k: abs(math.log(max(counts[k][1], 1) / lora_count)))
    value = counts[label][0]
    return {"field": size, "value": list(value) if isinstance(value, tuple) else value, "label": label,
            "candidate_counts": {k: c for k, (_, c) in counts.items()}, "candidate_errors": errors,
            "searched": not quick}


def not_applicable_row(method: str, peft_type: str, base: torch.nn.Module) -> dict:
    """The reason a type does not run on MiniLM, with what each library raises when asked anyway."""
    errors, b = {}, method_batch(method, 2, 8)
    for lib in ("unipeft", "peft"):
        try:
            loss_of(make_model(lib, method, fields(method), base), b).backward()
            errors[lib] = "built and stepped without error"
        except Exception as exc:  # noqa: BLE001 - the refusal is the finding
            errors[lib] = error_text(exc)[:300]
    return {"method": method, "peft_type": peft_type, "status": "not applicable",
            "reason": NOT_APPLICABLE[method], "errors": errors}


def memory_mb(lib: str, method: str, kw: dict, size: int, seq: int, steps: int) -> float:
    """Peak RSS (MB) of `steps` training steps in a fresh child process."""
    args = ["--child", lib, method, "--fields", json.dumps(kw), "--batch", str(size), "--seq", str(seq),
            "--steps", str(steps)]
    return peak_rss_mb("benchmarks.peft_types_cost", args)["peak_mb"]


def measure_type(method: str, peft_type: str, kw: dict, size_info: dict, lora: dict, base, b: dict,
                 args) -> dict:
    """One interleaved group: unipeft/type, peft/type and both LoRAs; counts, ratios and memory."""
    row = {"method": method, "peft_type": peft_type, "peft_class": peft_class(method), "fields": kw,
           "size": size_info, "status": "measured", "errors": {}, "params": {}, "note": NOTES.get(method)}
    steps = {}
    for lib in ("unipeft", "peft"):
        try:
            model = make_model(lib, method, kw, base)
            row["params"][lib] = adapter_params(model)
            steps[lib] = train_step(model, b)
            steps[lib]()  # a broken step fails here, not inside the timing loop
        except Exception as exc:  # noqa: BLE001 - one library failing a type is a result, not a crash
            steps.pop(lib, None)
            row["errors"][lib] = error_text(exc)
    if not steps:
        row["status"] = "failed"
        return row
    group = {f"{lib}/{method}": s for lib, s in steps.items()}
    if method != LORA:
        group.update({f"{lib}/{LORA}": s for lib, s in lora["steps"].items()})
    samples = interleaved_samples(group, args.repeat, args.warmup)
    row["samples"] = samples
    row["seconds"] = {k: statistics.median(v) for k, v in samples.items()}
    u, p = samples.get(f"unipeft/{method}"), samples.get(f"peft/{method}")
    if u and p:
        row["unipeft_over_peft"] = compare(u, p)
    for lib, s in (("unipeft", u), ("peft", p)):
        ref = samples.get(f"{lib}/{LORA}")
        if s and ref:
            row[f"{lib}_over_lora"] = compare(s, ref)
    if args.memory == "all" or (args.memory == "lora" and method == LORA):
        row["peak_mb"] = {}
        for lib in steps:
            try:
                row["peak_mb"][lib] = memory_mb(lib, method, kw, args.batch, args.seq, args.steps)
            except RuntimeError as exc:
                row["errors"][f"{lib} memory"] = str(exc)[-500:]
    return row


def run(args) -> dict:
    """Every selected type: size choice, interleaved timing against LoRA, memory; the payload."""
    from . import peft_types_cost_report as report

    torch.set_num_threads(1)
    types = peft_types()
    names = [n for n in args.methods.split(",") if n] if args.methods else sorted(types)
    unknown = sorted(set(names) - set(types))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(sorted(types))}")
    if LORA not in names:
        names = [LORA, *names]  # the reference every ratio is taken to
    unspecified = sorted(set(types) - set(SPECS) - set(NOT_APPLICABLE))
    b = batch(MODEL, args.batch, args.seq)
    base = build(MODEL)
    start = time.perf_counter()
    lora_kw = fields(LORA)
    lora = {"steps": {lib: train_step(make_model(lib, LORA, lora_kw, base), b) for lib in ("unipeft", "peft")}}
    lora_count = adapter_params(make_model("unipeft", LORA, lora_kw, base))
    rows = []
    for method in [LORA, *sorted(n for n in names if n != LORA)]:
        t0 = time.perf_counter()
        if method in NOT_APPLICABLE:
            row = not_applicable_row(method, types[method], base)
        else:
            size_info = choose_size(method, base, lora_count, args.quick)
            kw = fields(method, size_info.get("value"))
            row = measure_type(method, types[method], kw, size_info, lora, base,
                               method_batch(method, args.batch, args.seq), args)
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{method}: {report.one_line(row)}", file=sys.stderr, flush=True)
    # Types not asked for that cannot run on an encoder are listed too, with their reason.
    for method in sorted(set(NOT_APPLICABLE) & set(types) - set(names)):
        t0 = time.perf_counter()
        row = not_applicable_row(method, types[method], base)
        rows.append({**row, "wall_seconds": round(time.perf_counter() - t0, 1)})
    return {"benchmark": "peft_types_cost", "model": MODEL, "targets": TARGETS, "lora_params": lora_count,
            "batch": args.batch, "seq": args.seq, "repeat": args.repeat, "warmup": args.warmup,
            "memory_steps": args.steps, "memory": args.memory, "quick": args.quick, "torch_threads": 1,
            "types_registered": len(types), "types_without_spec": unspecified, "rows": rows,
            "versions": versions(), "wall_seconds": round(time.perf_counter() - start, 1),
            "load_average": list(os.getloadavg())}


def child(argv: list[str]) -> None:
    """Child process: peak RSS of a few training steps of one (library, type); prints one JSON line."""
    from .memprobe import peak_mb_since, reset_peak

    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=2, metavar=("LIB", "METHOD"), required=True)
    p.add_argument("--fields", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lib, method = a.child
    step = train_step(make_model(lib, method, json.loads(a.fields)), method_batch(method, a.batch, a.seq))
    rss0 = reset_peak()
    for _ in range(a.steps):
        step()
    print(json.dumps({"peak_mb": peak_mb_since(rss0), "steps": a.steps}))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", help="comma-separated unipeft method names (default: every PEFT type); "
                                     "lora is always added as the reference")
    p.add_argument("--repeat", type=int, help="interleaved timing rounds per type (default 12; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per model before the rounds (default 2; quick 1)")
    p.add_argument("--steps", type=int, help="training steps in each memory child (default 3; quick 1)")
    p.add_argument("--batch", type=int, help="default 16 (quick 4)")
    p.add_argument("--seq", type=int, help="tokens per example (default 64; quick 16)")
    p.add_argument("--memory", choices=["all", "lora", "none"],
                   help="which types get memory children (default all; quick lora)")
    p.add_argument("--quick", action="store_true", help="tiny run for the smoke test: first size candidate, "
                                                        "batch 4 x 16, 3 rounds, memory for LoRA only")
    p.add_argument("--out", type=Path, default=RESULTS / "peft_types_cost.json")
    args = p.parse_args(argv)
    defaults = {"repeat": (12, 3), "warmup": (2, 1), "steps": (3, 1), "batch": (16, 4), "seq": (64, 16),
                "memory": ("all", "lora")}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> Path:
    """Measure and write the JSON, markdown and PNG."""
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        child(argv)
        return Path()
    from . import peft_types_cost_report as report
    from .common import write_outputs

    args = parse(argv)
    res = report.summarise(run(args))
    return write_outputs(args.out, res, report.markdown, report.plot)


if __name__ == "__main__":
    main()
