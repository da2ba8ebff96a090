"""unipeft vs peft, side by side in one run: training step, memory, inference, mixed batches,
adapter injection/loading and merging. Every figure is a ratio (ours vs peer vs bound)."""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import peft
import torch

import unipeft as up

from .common import interleaved, peak_rss_mb
from .models import batch, build, loss_of

TARGETS = {  # per model: attention query/value, a feed-forward layer, the IA3 (k, v, ff) triple
    "minilm": {"qv": ["query", "value"], "ia3": ["key", "value", "output.dense"], "ff": ["output.dense"]},
    "tiny-gpt2": {"qv": ["c_attn"], "ia3": ["c_attn", "c_fc"], "ff": ["c_fc"]},
    "micro-gpt2": {"qv": ["c_attn"], "ia3": ["c_attn", "c_fc"], "ff": ["c_fc"]},
}
METHODS = ("lora_qv", "lora_all_linear", "dora", "ia3")


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
    raise ValueError(method)


def adapted(lib: str, model: str, method: str, seed: int = 0) -> torch.nn.Module:
    """A fresh base model adapted by `lib` ('unipeft' or 'peft') with `method`."""
    cfg = peft_config(model, method)
    if lib == "peft":
        return peft.get_peft_model(build(model, seed), cfg)
    return up.adapt(build(model, seed), up.AdapterConfig.from_dict(cfg.to_dict()))


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


def _train_step(model: torch.nn.Module, b: dict):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model, b).backward()
        opt.step()
    return step


def training_rows(model: str, size: int, seq: int, repeat: int, memory: bool) -> list[dict]:
    """Step time (and peak memory) per method, for both libraries, relative to the bound."""
    rows = []
    b = batch(model, size, seq)
    for method in METHODS:
        steps = {"unipeft": _train_step(adapted("unipeft", model, method).train(), b),
                 "peft": _train_step(adapted("peft", model, method).train(), b),
                 "bound": bound_step(model, b)}
        t = interleaved(steps, repeat)
        row = {"row": "train_step", "model": model, "method": method, "batch": size, "seq": seq,
               "seconds": t, "unipeft_over_bound": t["unipeft"] / t["bound"],
               "peft_over_bound": t["peft"] / t["bound"], "unipeft_over_peft": t["unipeft"] / t["peft"]}
        if memory:
            mem = {lib: peak_rss_mb("benchmarks.memprobe", ["--lib", lib, "--model", model, "--method", method,
                                                            "--batch", str(size), "--seq", str(seq)])["peak_mb"]
                   for lib in ("unipeft", "peft", "bound")}
            row.update(peak_mb=mem, mem_unipeft_over_peft=mem["unipeft"] / max(mem["peft"], 1e-9))
        rows.append(row)
    return rows


def inference_rows(model: str, sizes: tuple[int, ...], seq: int, repeat: int) -> list[dict]:
    """Unmerged LoRA inference latency overhead over the base model, both libraries."""
    rows = []
    base = build(model).eval()
    ours = adapted("unipeft", model, "lora_qv").eval()
    theirs = adapted("peft", model, "lora_qv").eval()
    for size in sizes:
        b = batch(model, size, seq)
        with torch.inference_mode():
            t = interleaved({k: (lambda m=m: m(**b)) for k, m in
                             (("base", base), ("unipeft", ours), ("peft", theirs))}, repeat, inner=3)
        over = {k: t[k] / t["base"] - 1 for k in ("unipeft", "peft")}
        rows.append({"row": "inference_overhead", "model": model, "batch": size, "seq": seq, "seconds": t,
                     "overhead": over, "unipeft_overhead_over_peft": over["unipeft"] / over["peft"]
                     if over["peft"] > 0 else None})
    return rows


def _with_adapters(lib: str, model: str, n: int):
    m = adapted(lib, model, "lora_qv")
    cfg = peft_config(model, "lora_qv")
    for i in range(1, n):
        if lib == "peft":
            m.add_adapter(f"a{i}", copy.deepcopy(cfg))
        else:
            m.add_adapter(f"a{i}", up.AdapterConfig.from_dict(cfg.to_dict()))
    with torch.no_grad():  # distinct non-zero adapters, as after training
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return m.eval()


def mixed_batch_rows(model: str, size: int, seq: int, n_adapters: int, repeat: int) -> list[dict]:
    """Throughput with n adapters mixed in one batch vs the same batch on one adapter."""
    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    per_row = [names[i % n_adapters] for i in range(size)]
    b = batch(model, size, seq)
    ours, theirs = _with_adapters("unipeft", model, n_adapters), _with_adapters("peft", model, n_adapters)
    with torch.inference_mode():
        t = interleaved({"unipeft_mixed": lambda: ours(**b, adapter_names=per_row),
                         "peft_mixed": lambda: theirs(**b, adapter_names=per_row),
                         "unipeft_single": lambda: ours(**b), "peft_single": lambda: theirs(**b)}, repeat)
    return [{"row": "mixed_batch", "model": model, "batch": size, "seq": seq, "adapters": n_adapters,
             "seconds": t, "unipeft_throughput_over_peft": t["peft_mixed"] / t["unipeft_mixed"],
             "unipeft_mixed_over_single": t["unipeft_mixed"] / t["unipeft_single"],
             "peft_mixed_over_single": t["peft_mixed"] / t["peft_single"],
             # the cost of mixing itself (mixed minus single-adapter time), which is what a library controls
             "unipeft_mixing_cost_over_peft": _ratio(t["unipeft_mixed"] - t["unipeft_single"],
                                                     t["peft_mixed"] - t["peft_single"])}]


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is not positive (a difference of medians can be noise-level)."""
    return a / b if b > 0 else None


def _around(times: dict[int, float], k: int, half: int = 2) -> float:
    """Median time of the adapters k-half..k+half: one ~ms call is too noisy to compare alone."""
    return statistics.median(t for j, t in times.items() if abs(j - k) <= half)


def inject_load_rows(model: str, n: int, marks: tuple[int, ...]) -> list[dict]:
    """Time to inject (add_adapter) and to load (load_adapter) the k-th adapter, k in marks."""
    cfg = peft_config(model, "lora_qv")
    with tempfile.TemporaryDirectory() as tmp:
        adapted("peft", model, "lora_qv").save_pretrained(tmp)
        out = {}
        for lib in ("unipeft", "peft"):
            inj, load = adapted(lib, model, "lora_qv"), adapted(lib, model, "lora_qv")
            inject_t, load_t = {}, {}
            for k in range(2, n + 1):
                c = copy.deepcopy(cfg) if lib == "peft" else up.AdapterConfig.from_dict(cfg.to_dict())
                t0 = time.perf_counter()
                inj.add_adapter(f"x{k}", c)
                inject_t[k] = time.perf_counter() - t0
                t0 = time.perf_counter()
                load.load_adapter(tmp, f"x{k}")
                load_t[k] = time.perf_counter() - t0
            out[lib] = {"inject": {m: _around(inject_t, m) for m in marks}, "load": {m: _around(load_t, m) for m in marks}}
    first, last = marks[0], marks[-1]
    return [{"row": "inject_load", "model": model, "marks": list(marks), "seconds": out,
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
