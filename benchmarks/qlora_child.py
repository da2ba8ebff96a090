"""Child processes of benchmarks/qlora.py: one measures one (library, base precision, method) alone,
so its memory figures are its own; the other times unipeft and PEFT steps in alternation.

`python -m benchmarks.qlora_child memory --lib unipeft --quant nf4 --method lora --steps 40 --lr 1e-3`
`python -m benchmarks.qlora_child timing --quant nf4 --rounds 12`
Each prints one JSON line. Memory is read from /proc (VmRSS, VmHWM reset through clear_refs; the
loading peak spans loading and one forward of one example, since a float32 safetensors file is
mapped and only read when the weights are first used),
with the allocator pinned by the parent (MALLOC_ENV), and from torch's own accounting (bytes of
the weights, of the optimizer state, and of the tensors autograd saves for one backward).
Training peaks are given above the loaded model (`train_peak*`) and in all, above the process
before loading (`train_total*`: the loaded base + what training adds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

import torch

from .memprobe import _status, peak_mb_since, reset_peak

MAX_LENGTH, BATCH, EXAMPLES = 96, 8, 700
LORA = {"r": 8, "alpha": 16, "targets": "all-linear"}


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def data(tokenizer, eval_examples: int = 64) -> dict[str, list]:
    """Encoded WordNet define-a-word splits (chat template, loss on the answer), fixed for every child."""
    from unipeft.data.encode import encode_split
    from unipeft.data.wordnet import load_wordnet

    splits = load_wordnet(0, [0.8, 0.1, 0.1], max_examples=EXAMPLES)
    out = {}
    for name in ("train", "valid", "test"):
        rows = encode_split(tokenizer, splits.get(name), MAX_LENGTH, chat=True).rows
        out[name] = rows if name == "train" else rows[:eval_examples]
    return out


def batches(rows: list, steps: int, pad_id: int, seed: int = 0) -> list[dict]:
    """`steps` training batches, the same sequence in every child."""
    from unipeft.data.encode import collate

    order = list(range(len(rows)))
    rng, out = random.Random(seed), []
    while len(out) < steps:
        rng.shuffle(order)
        for s in range(0, len(order) - BATCH + 1, BATCH):
            out.append(collate([rows[i] for i in order[s:s + BATCH]], pad_id))
    return out[:steps]


@torch.no_grad()
def evaluate(model, rows: list, pad_id: int) -> dict:
    """Token-weighted loss, perplexity and next-token accuracy over the answer tokens.

    Run in training mode (SmolLM2 has no dropout and LoRA's is 0, so the outputs are eval mode's):
    an eval-mode forward of a bitsandbytes Linear4bit on this CPU repacks its weight for an
    inference kernel without a backward, which would break the training steps after it on a
    model that does not undo that (unipeft does; a plain PEFT model does not).
    """
    from unipeft.data.encode import collate

    model.train()
    total, hits, count = 0.0, 0, 0
    for s in range(0, len(rows), 16):
        b = collate(rows[s:s + 16], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        mask = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        hits += int((logits.argmax(-1)[mask] == labels[mask]).sum())
        count += int(mask.sum())
    return {"loss": total / count, "perplexity": math.exp(total / count), "token_accuracy": hits / count,
            "tokens": count}


def load_base(lib: str, quant: str):
    """The base in the library's own way: unipeft's loader (streamed) or transformers' from_pretrained."""
    from transformers import AutoModelForCausalLM

    from unipeft.train.models import model_path
    from unipeft.train.quantize import QuantizationConfig, load_quantized

    path = str(model_path("smollm2"))
    spec = {"fp32": None, "nf4": QuantizationConfig(bits=4), "int8": QuantizationConfig(bits=8)}[quant]
    if spec is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lib == "unipeft":
        return load_quantized(path, AutoModelForCausalLM, spec)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=spec.bnb_config())


def adapt(lib: str, base, method: str):
    """LoRA (r 8, alpha 16, all linears; `lora_loftq`: A, B from LoftQ against the float32 weights),
    or PEQA, on the base; PEFT's QLoRA recipe for PEFT."""
    if lib == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(base, "is_quantized", False):
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        return get_peft_model(base, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    import unipeft as up

    if method == "peqa":
        return up.adapt(base, up.PeqaConfig(target_modules="all-linear"))
    model = up.adapt(base, up.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], target_modules="all-linear", dropout=0.0))
    if method == "lora_loftq":
        from unipeft.train.models import model_path

        up.replace_lora_weights_loftq(model, weights=str(model_path("smollm2")))
    return model


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer, quantization states (absmax, code books) included."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied embedding / LM head
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
    return total


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves in one forward for the backward."""
    storages: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.device.type == "cpu":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def train_steps(model, opt, steps: list[dict], autocast: bool = False) -> list[float]:
    """One optimizer step per batch; the wall time of each."""
    times = []
    for b in steps:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def enable_checkpointing(lib: str, model) -> None:
    inner = model.base_model if lib == "unipeft" else model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lib == "peft":
        model.enable_input_require_grads()


def memory_child(lib: str, quant: str, method: str, steps: int, lr: float, ckpt_steps: int,
                 eval_examples: int) -> dict:
    from unipeft.train.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    sets = data(tok, eval_examples)
    pad = tok.pad_token_id
    train = batches(sets["train"], steps + ckpt_steps + 1, pad)
    torch.manual_seed(0)
    rss0 = reset_peak()
    base = load_base(lib, quant).train()  # training mode from the start: see evaluate()
    with torch.no_grad():  # touch every weight once (mapped fp32 files become resident on first use)
        base(input_ids=train[0]["input_ids"][:1])
    load_peak = peak_mb_since(rss0)  # loading until the model has computed once
    resident = round((_status("VmRSS") - rss0) / 1024, 1)
    weights = tensor_bytes(base)
    base_eval = evaluate(base, sets["test"], pad) if method == "lora" else None  # the untouched base
    model = adapt(lib, base, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    activations = saved_activation_bytes(model, train[0])
    rss1 = reset_peak()
    times = train_steps(model, opt, train[1:steps + 1])
    train_peak, train_total = peak_mb_since(rss1), peak_mb_since(rss0)
    optimizer_state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor))
    valid, test = evaluate(model, sets["valid"], pad), evaluate(model, sets["test"], pad)
    enable_checkpointing(lib, model)
    model.train()
    ckpt_activations = saved_activation_bytes(model, train[0])
    rss2 = reset_peak()
    ckpt_times = train_steps(model, opt, train[steps + 1:])
    ckpt_peak, ckpt_total = peak_mb_since(rss2), peak_mb_since(rss0)
    warm = min(max(2, len(times) // 10), len(times) - 1)  # the first steps warm up (a 1-step smoke run keeps it)
    return {"lib": lib, "quant": quant, "method": method, "lr": lr, "steps": steps,
            "trainable_params": sum(p.numel() for p in params),
            "resident_base_mb": resident, "load_peak_mb": load_peak, "train_peak_mb": train_peak,
            "train_peak_ckpt_mb": ckpt_peak, "train_total_mb": train_total, "train_total_ckpt_mb": ckpt_total,
            "rss_before_load_mb": round(rss0 / 1024, 1),
            "torch": {"weights_mb": _mb(weights), "activations_mb": _mb(activations),
                      "activations_ckpt_mb": _mb(ckpt_activations), "optimizer_state_mb": _mb(optimizer_state)},
            "step_seconds": statistics.median(times[warm:]), "step_seconds_ckpt": statistics.median(ckpt_times),
            "valid": valid, "test": test, "base_test": base_eval}


def timing_child(quant: str, rounds: int) -> dict:
    """unipeft vs PEFT (same base precision, LoRA) and, on fp32, unipeft under bf16 autocast: steps in alternation."""
    from unipeft.train.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    train = batches(data(tok)["train"], rounds + 2, tok.pad_token_id)
    runs = {}
    for lib in ("unipeft", "peft"):
        torch.manual_seed(0)
        model = adapt(lib, load_base(lib, quant).train(), "lora")
        model.train()
        runs[lib] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), False)
    if quant == "fp32":
        runs["unipeft_bf16_autocast"] = (runs["unipeft"][0], runs["unipeft"][1], True)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for b in train[:2]:  # warm-up
        for model, opt, ac in runs.values():
            train_steps(model, opt, [b], ac)
    keys = list(runs)
    for r, b in enumerate(train[2:]):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            model, opt, ac = runs[key]
            samples[key] += train_steps(model, opt, [b], ac)
    return {"quant": quant, "rounds": rounds, "samples": samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["memory", "timing"])
    p.add_argument("--lib", choices=["unipeft", "peft"], default="unipeft")
    p.add_argument("--quant", choices=["fp32", "nf4", "int8"], default="nf4")
    p.add_argument("--method", choices=["lora", "lora_loftq", "peqa"], default="lora")
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ckpt-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.mode == "memory":
        out = memory_child(a.lib, a.quant, a.method, a.steps, a.lr, a.ckpt_steps, a.eval_examples)
    else:
        out = timing_child(a.quant, a.rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
