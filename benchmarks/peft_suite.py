"""unipeft vs peft, side by side in one run: training step, memory, inference, mixed batches,
adapter injection/loading and merging. Every figure is a ratio (ours vs peer vs bound) with the
paired-bootstrap band of benchmarks/stats.py; the per-round samples stay in the rows."""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import peft
import torch

import unipeft as up

from .common import interleaved_samples, peak_rss_mb
from .models import batch, build, loss_of
from .stats import compare

TARGETS = {  # per model: attention query/value, a feed-forward layer, the IA3 (k, v, ff) triple
    "minilm": {"qv": ["query", "value"], "ia3": ["key", "value", "output.dense"], "ff": ["output.dense"]},
    "tiny-gpt2": {"qv": ["c_attn"], "ia3": ["c_attn", "c_fc"], "ff": ["c_fc"]},
    "micro-gpt2": {"qv": ["c_attn"], "ia3": ["c_attn", "c_fc"], "ff": ["c_fc"]},
}
TASK_TYPE = {"minilm": "SEQ_CLS", "tiny-gpt2": "CAUSAL_LM", "micro-gpt2": "CAUSAL_LM"}  # prompt methods need it
METHODS = ("lora_qv", "lora_all_linear", "dora", "ia3", "prompt_tuning", "prefix_tuning")
VIRTUAL_TOKENS = 16  # prompt and prefix tuning, both libraries


def peft_config(model: str, method: str):
    """The peer's config for a benchmark method (ours is built from the same dict)."""
    t = TARGETS[model]
    if method == "lora_qv":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=t["qv"])
    if method == "lora_all_linear":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    if method == "dora":
        return peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=t["qv"])
    if method == "ia3":
        return peft.IA3Config(target_modules=t["ia3"], feedforward_modules=t["ff"])
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=TASK_TYPE[model], num_virtual_tokens=VIRTUAL_TOKENS)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=TASK_TYPE[model], num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(method)


def unipeft_config(cfg) -> up.AdapterConfig:
    """Our config from the peer's dict. A fresh PEFT prompt config holds num_transformer_submodules=None
    (PEFT fills in 1 at get_peft_model), which unipeft's from_dict rejects; the benchmark drops that key."""
    data = cfg.to_dict()
    if data.get("num_transformer_submodules", 0) is None:
        del data["num_transformer_submodules"]
    return up.AdapterConfig.from_dict(data)


def adapted(lib: str, model: str, method: str, seed: int = 0) -> torch.nn.Module:
    """A fresh base model adapted by `lib` ('unipeft' or 'peft') with `method`."""
    cfg = peft_config(model, method)
    if lib == "peft":
        return peft.get_peft_model(build(model, seed), cfg)
    return up.adapt(build(model, seed), unipeft_config(cfg))


def bound_step(model: str, b: dict):
    """The bound: the frozen model in train mode (same dropout as the adapted ones), forward +
    backward w.r.t. the input embeddings only."""
    base = build(model).train()
    for p in base.parameters():
        p.requires_grad_(False)

    def step() -> None:
        emb = base.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
        base(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits.float().pow(2).mean().backward()
    return step


def train_step(model: torch.nn.Module, b: dict):
    """One AdamW step of `model` on batch `b` (zero_grad, forward, backward, step) as a closure."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model, b).backward()
        opt.step()
    return step


def error_text(exc: BaseException) -> str:
    """What a failed measurement records instead of a figure."""
    return f"{type(exc).__name__}: {str(exc)[:1500]}"


def training_steps(model: str, b: dict, methods: tuple[str, ...] = METHODS) -> tuple[dict, dict]:
    """{'bound' | '<lib>/<method>': step closure} (each run once, so a broken one is caught here) and {key: error}."""
    steps, errors = {"bound": bound_step(model, b)}, {}
    for method in methods:
        for lib in ("unipeft", "peft"):
            key = f"{lib}/{method}"
            try:
                steps[key] = train_step(adapted(lib, model, method).train(), b)
                steps[key]()
            except Exception as exc:  # noqa: BLE001 - one library failing a method is a result, not a crash
                steps.pop(key, None)
                errors[key] = error_text(exc)
    return steps, errors


def training_rows(model: str, size: int, seq: int, repeat: int, memory: bool,
                  methods: tuple[str, ...] = METHODS) -> list[dict]:
    """Step time per method, both libraries and the bound in ONE interleaved group (so every pair of
    figures, e.g. DoRA vs LoRA q,v, is measured side by side), and peak memory in child processes."""
    b = batch(model, size, seq)
    steps, errors = training_steps(model, b, methods)
    samples = interleaved_samples(steps, repeat)
    rows = []
    for method in methods:
        u, p = samples.get(f"unipeft/{method}"), samples.get(f"peft/{method}")
        row = {"row": "train_step", "model": model, "method": method, "batch": size, "seq": seq,
               "seconds": {k: statistics.median(v) for k, v in (("unipeft", u), ("peft", p),
                                                                ("bound", samples["bound"])) if v},
               "samples": {"unipeft": u, "peft": p, "bound": samples["bound"]},
               "errors": {k: v for k, v in errors.items() if k.endswith("/" + method)}}
        if u:
            row["unipeft_over_bound"] = compare(u, samples["bound"])
        if p:
            row["peft_over_bound"] = compare(p, samples["bound"])
        if u and p:
            row["unipeft_over_peft"] = compare(u, p)
        if method == "dora" and u and samples.get("unipeft/lora_qv"):
            row["unipeft_over_unipeft_lora_qv"] = compare(u, samples["unipeft/lora_qv"])
        if memory:
            mem = {lib: peak_rss_mb("benchmarks.memprobe", ["--lib", lib, "--model", model, "--method", method,
                                                            "--batch", str(size), "--seq", str(seq)])["peak_mb"]
                   for lib in ("unipeft", "peft", "bound") if lib == "bound" or f"{lib}/{method}" in steps}
            row["peak_mb"] = mem
            if "unipeft" in mem and "peft" in mem:
                row["mem_unipeft_over_peft"] = mem["unipeft"] / max(mem["peft"], 1e-9)
        rows.append(row)
    return rows


def _trained_like(m: torch.nn.Module) -> torch.nn.Module:
    """Give every LoRA up-projection non-zero values, as after training (a zero adapter is a special case)."""
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return m


def inference_models(model: str) -> dict[str, torch.nn.Module]:
    """The base model and unmerged LoRA q,v (non-zero) of both libraries, in eval mode."""
    return {"base": build(model).eval(), "unipeft": _trained_like(adapted("unipeft", model, "lora_qv")).eval(),
            "peft": _trained_like(adapted("peft", model, "lora_qv")).eval()}


def inference_rows(model: str, sizes: tuple[int, ...], seq: int, repeat: int) -> list[dict]:
    """Unmerged LoRA inference latency over the base model, both libraries."""
    rows = []
    models = inference_models(model)
    for size in sizes:
        b = batch(model, size, seq)
        with torch.inference_mode():
            s = interleaved_samples({k: (lambda m=m: m(**b)) for k, m in models.items()}, repeat, inner=3)
        ours, theirs = compare(s["unipeft"], s["base"]), compare(s["peft"], s["base"])
        rows.append({"row": "inference_overhead", "model": model, "batch": size, "seq": seq,
                     "seconds": {k: statistics.median(v) for k, v in s.items()}, "samples": s,
                     "unipeft_over_base": ours, "peft_over_base": theirs,
                     "overhead": {"unipeft": ours["ratio"] - 1, "peft": theirs["ratio"] - 1},
                     "unipeft_over_peft": compare(s["unipeft"], s["peft"])})
    return rows


def _with_adapters(lib: str, model: str, n: int):
    m = adapted(lib, model, "lora_qv")
    cfg = peft_config(model, "lora_qv")
    for i in range(1, n):
        if lib == "peft":
            m.add_adapter(f"a{i}", copy.deepcopy(cfg))
        else:
            m.add_adapter(f"a{i}", unipeft_config(cfg))
    return _trained_like(m).eval()  # distinct non-zero adapters, as after training


def mixed_batch_rows(model: str, size: int, seq: int, n_adapters: int, repeat: int) -> list[dict]:
    """A batch whose rows use n different adapters, vs the base model alone (and peft, and one adapter)."""
    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    per_row = [names[i % n_adapters] for i in range(size)]
    b = batch(model, size, seq)
    base = build(model).eval()
    ours, theirs = _with_adapters("unipeft", model, n_adapters), _with_adapters("peft", model, n_adapters)
    with torch.inference_mode():
        s = interleaved_samples({"base": lambda: base(**b), "unipeft_mixed": lambda: ours(**b, adapter_names=per_row),
                                 "peft_mixed": lambda: theirs(**b, adapter_names=per_row),
                                 "unipeft_single": lambda: ours(**b)}, repeat)
    return [{"row": "mixed_batch", "model": model, "batch": size, "seq": seq, "adapters": n_adapters,
             "distinct_adapters_in_batch": len(set(per_row)),
             "seconds": {k: statistics.median(v) for k, v in s.items()}, "samples": s,
             "unipeft_mixed_over_base": compare(s["unipeft_mixed"], s["base"]),
             "peft_mixed_over_base": compare(s["peft_mixed"], s["base"]),
             "unipeft_mixed_over_peft_mixed": compare(s["unipeft_mixed"], s["peft_mixed"]),
             "unipeft_mixed_over_single": compare(s["unipeft_mixed"], s["unipeft_single"])}]


def window(k: int, n: int, half: int = 2) -> tuple[int, int]:
    """The adapters whose times stand for the k-th: k-half..k+half, clipped to the measured 2..n."""
    return max(2, k - half), min(n, k + half)


def window_label(w: tuple[int, int]) -> str:
    """'adapters 48-50' for the window (48, 50)."""
    return f"adapter {w[0]}" if w[0] == w[1] else f"adapters {w[0]}-{w[1]}"


def inject_load_rows(model: str, n: int, marks: tuple[int, ...]) -> list[dict]:
    """Time to inject (add_adapter) and to load (load_adapter) the k-th adapter, as the median over a window
    of adapters around k (one ~ms call is too noisy alone): the last window's median over the first's."""
    cfg = peft_config(model, "lora_qv")
    windows = {m: window(m, n) for m in marks}
    with tempfile.TemporaryDirectory() as tmp:
        adapted("peft", model, "lora_qv").save_pretrained(tmp)
        out = {}
        for lib in ("unipeft", "peft"):
            inj, load = adapted(lib, model, "lora_qv"), adapted(lib, model, "lora_qv")
            inject_t, load_t = {}, {}
            for k in range(2, n + 1):  # adapter 1 is the one adapted() made
                c = copy.deepcopy(cfg) if lib == "peft" else unipeft_config(cfg)
                t0 = time.perf_counter()
                inj.add_adapter(f"x{k}", c)
                inject_t[k] = time.perf_counter() - t0
                t0 = time.perf_counter()
                load.load_adapter(tmp, f"x{k}")
                load_t[k] = time.perf_counter() - t0

            def med(times: dict[int, float], w: tuple[int, int]) -> float:
                return statistics.median(times[j] for j in range(w[0], w[1] + 1))
            out[lib] = {"inject": {m: med(inject_t, windows[m]) for m in marks},
                        "load": {m: med(load_t, windows[m]) for m in marks}}
    first, last = marks[0], marks[-1]
    return [{"row": "inject_load", "model": model, "marks": list(marks), "seconds": out,
             "windows": {str(m): list(w) for m, w in windows.items()},
             "label": f"median of {window_label(windows[last])} / median of {window_label(windows[first])}",
             "unipeft_last_over_first": {op: out["unipeft"][op][last] / out["unipeft"][op][first]
                                         for op in ("inject", "load")},
             "peft_last_over_first": {op: out["peft"][op][last] / out["peft"][op][first]
                                      for op in ("inject", "load")},
             "unipeft_over_peft_at_last": {op: out["unipeft"][op][last] / out["peft"][op][last]
                                           for op in ("inject", "load")}}]


def merge_rows(model: str, seq: int) -> list[dict]:
    """merge_and_unload time and the max deviation of merged vs unmerged outputs, both libraries."""
    b = batch(model, 4, seq)
    row: dict = {"row": "merge", "model": model, "seconds": {}, "max_abs_deviation": {}}
    for lib in ("unipeft", "peft"):
        m = _with_adapters(lib, model, 1)
        with torch.no_grad():
            ref = m(**b).logits
            t0 = time.perf_counter()
            merged = m.merge_and_unload()
            row["seconds"][lib] = time.perf_counter() - t0
            row["max_abs_deviation"][lib] = (merged(**b).logits - ref).abs().max().item()
    row["unipeft_over_peft"] = row["seconds"]["unipeft"] / row["seconds"]["peft"]
    return [row]
