"""fp32 LoRA vs NF4 QLoRA vs int8 LoRA vs PEQA on SmolLM2-135M-Instruct, unipeft beside PEFT + bitsandbytes.

    python -m benchmarks.qlora [--steps 40] [--rounds 10] [--eval-examples 48] [--threads 2]

Task: define WordNet words (chat template, loss on the answer tokens; held-out words for test).
Every configuration trains the same batches for the same number of steps in its own process with
glibc's allocator pinned (MALLOC_ENV), which reports: the resident memory of the loaded base
(after one forward has touched every weight), the loading peak, the training peak without and
with gradient checkpointing (VmHWM reset before the steps), torch's own accounting (weights,
saved activations, optimizer state), step times and test perplexity. LoRA (r 8, alpha 16, all
linears, dropout 0) trains at lr 1e-3 everywhere (LoftQ: A, B fitted to the NF4 error of the
float32 weights); PEQA's lr is chosen on the validation split from PEQA_LRS. Evaluations run in
training mode (no dropout anywhere), so bitsandbytes never repacks a PEFT model's 4-bit weights
for its inference kernel, which has no backward. Step-time ratios come from a second kind of child that alternates unipeft and
PEFT steps (and bf16 autocast on fp32) on the same batches: ratio of medians with a paired
bootstrap band (benchmarks/stats.py). Writes results/qlora.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, versions, write_outputs
from .plots import bars, panels, save
from .stats import compare, verdict

ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
LORA_LR = 1e-3
PEQA_LRS = (3e-4, 3e-3)
RUNS = [("unipeft", "fp32", "lora"), ("unipeft", "nf4", "lora"), ("unipeft", "nf4", "lora_loftq"),
        ("unipeft", "int8", "lora"), ("peft", "fp32", "lora"), ("peft", "nf4", "lora"), ("peft", "int8", "lora")]


def _child(args: list[str], threads: int) -> dict:
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.qlora_child", *args, "--threads", str(threads)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"qlora_child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["child_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}), file=sys.stderr, flush=True)
    return res


def key(run: dict) -> str:
    return f"{run['lib']} {run['quant']} {run['method']}"


def choose(search: list[dict]) -> dict:
    """The run with the lowest validation loss (ties: the smaller lr); test figures are not read."""
    return min(search, key=lambda r: (r["valid"]["loss"], r["lr"]))


def measure(a: argparse.Namespace) -> dict:
    budget = ["--steps", str(a.steps), "--ckpt-steps", str(a.ckpt_steps), "--eval-examples", str(a.eval_examples)]
    runs = [_child(["memory", "--lib", lib, "--quant", q, "--method", m, "--lr", repr(LORA_LR), *budget], a.threads)
            for lib, q, m in RUNS]
    peqa = [_child(["memory", "--lib", "unipeft", "--quant", "nf4", "--method", "peqa", "--lr", repr(lr), *budget],
                   a.threads) for lr in PEQA_LRS]
    chosen = choose(peqa)  # on validation, never test
    timing = {q: _child(["timing", "--quant", q, "--rounds", str(a.rounds)], a.threads)
              for q in ("fp32", "nf4", "int8")}
    return {"runs": runs + [chosen], "peqa_search": [{"lr": r["lr"], "valid_loss": r["valid"]["loss"]} for r in peqa],
            "timing": timing}


def targets(res: dict) -> list[dict]:
    """Each target with its measured value and verdict."""
    by = {key(r): r for r in res["runs"]}
    fp32, nf4, int8 = by["unipeft fp32 lora"], by["unipeft nf4 lora"], by["unipeft int8 lora"]
    out = []

    def point(name: str, value: float, target: float, how: str, note: str) -> None:
        out.append({"target": name, "value": value, "band": None, "goal": f"{how} {target}", "note": note,
                    "verdict": verdict([value, value], target, how)})

    point("NF4 base resident / fp32 base resident", nf4["resident_base_mb"] / fp32["resident_base_mb"], 0.35, "<=",
          f"{nf4['resident_base_mb']} vs {fp32['resident_base_mb']} MB RSS after load + one forward "
          f"(torch accounting {nf4['torch']['weights_mb']} vs {fp32['torch']['weights_mb']} MB)")
    point("NF4 loading peak / fp32 loading peak", nf4["load_peak_mb"] / fp32["load_peak_mb"], 1.0, "<=",
          f"{nf4['load_peak_mb']} vs {fp32['load_peak_mb']} MB (PEFT's path, transformers from_pretrained: "
          f"{by['peft nf4 lora']['load_peak_mb']} MB)")
    point("NF4 training peak / fp32 training peak, checkpointing on", nf4["train_total_ckpt_mb"] /
          fp32["train_total_ckpt_mb"], 1.0, "<=", f"{nf4['train_total_ckpt_mb']} vs {fp32['train_total_ckpt_mb']} MB, "
          f"base + training (int8: {int8['train_total_ckpt_mb']} MB); above the loaded model "
          f"{nf4['train_peak_ckpt_mb']} vs {fp32['train_peak_ckpt_mb']} MB")
    point("NF4 training peak / fp32 training peak, checkpointing off", nf4["train_total_mb"] /
          fp32["train_total_mb"], 1.0, "<=", f"{nf4['train_total_mb']} vs {fp32['train_total_mb']} MB, base + "
          f"training; above the loaded model {nf4['train_peak_mb']} vs {fp32['train_peak_mb']} MB")
    for name, run in (("NF4", nf4), ("NF4 + LoftQ init", by["unipeft nf4 lora_loftq"]), ("int8", int8)):
        point(f"{name} test perplexity / fp32 LoRA test perplexity", run["test"]["perplexity"] /
              fp32["test"]["perplexity"], 1.05, "<=", f"{run['test']['perplexity']:.3f} vs "
              f"{fp32['test']['perplexity']:.3f} after {fp32['steps']} steps, one seed (no band); untouched base "
              f"{(run['base_test'] or nf4['base_test'])['perplexity']:.2f} vs {fp32['base_test']['perplexity']:.2f} "
              f"in fp32")
    for quant in ("nf4", "int8", "fp32"):
        s = res["timing"][quant]["samples"]
        c = compare(s["unipeft"], s["peft"])
        out.append({"target": f"{quant} LoRA step time, unipeft / PEFT", "value": c["ratio"], "band": c["band"],
                    "goal": "<= 1.0", "note": f"{c['repeats']} alternating rounds", "verdict": verdict(c["band"], 1.0)})
    s = res["timing"]["fp32"]["samples"]
    c = compare(s["unipeft_bf16_autocast"], s["unipeft"])
    out.append({"target": "fp32 LoRA step time, bf16 autocast / fp32", "value": c["ratio"], "band": c["band"],
                "goal": "<= 1.0 (faster)", "note": f"{c['repeats']} alternating rounds", "verdict": verdict(c["band"], 1.0)})
    return out


def markdown(res: dict) -> str:
    lines = ["# Quantized bases on SmolLM2-135M-Instruct: fp32 LoRA, NF4 QLoRA, int8 LoRA, PEQA", "",
             f"WordNet define-a-word, {res['steps']} steps of batch 8, {res['threads']} threads; generated by "
             f"`python -m benchmarks.qlora` in {res['seconds']:.0f} s (versions in qlora.json).", "",
             "Memory in MB above the process before loading; training peaks: the loaded base + training (what "
             "training adds on top of the loaded model in the JSON).", "",
             "| run | resident base | load peak | train peak | train peak, ckpt | weights (torch) | "
             "activations (ckpt) | optimizer | step s (ckpt) | base test ppl | test ppl | token acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        t = r["torch"]
        base = f"{r['base_test']['perplexity']:.2f}" if r.get("base_test") else "-"
        name = key(r) + (f" (lr {r['lr']:g})" if r["method"] == "peqa" else "")
        lines.append(f"| {name} | {r['resident_base_mb']} | {r['load_peak_mb']} | {r['train_total_mb']} | "
                     f"{r['train_total_ckpt_mb']} | {t['weights_mb']} | {t['activations_mb']} ({t['activations_ckpt_mb']}) "
                     f"| {t['optimizer_state_mb']} | {r['step_seconds']:.3f} ({r['step_seconds_ckpt']:.3f}) | {base} | "
                     f"{r['test']['perplexity']:.3f} | {r['test']['token_accuracy']:.3f} |")
    lines += ["", "PEQA's lr, chosen on validation loss: " + ", ".join(
        f"{s['lr']:g} -> {s['valid_loss']:.4f}" for s in res["peqa_search"]), "",
        "## Targets", "", "| target | value | 90% band | goal | verdict | note |", "|---|---|---|---|---|---|"]
    for t in res["targets"]:
        band = f"[{t['band'][0]:.3f}, {t['band'][1]:.3f}]" if t["band"] else "-"
        lines.append(f"| {t['target']} | {t['value']:.3f} | {band} | {t['goal']} | {t['verdict']} | {t['note']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    fig, (mem, step, ppl) = panels(3, "SmolLM2-135M: quantized bases, unipeft and PEFT", cols=3, size=(6.2, 4.0))
    names = [key(r).replace(" lora", "") for r in res["runs"]]
    bars(mem, names, {"resident base": [r["resident_base_mb"] for r in res["runs"]],
                      "load peak": [r["load_peak_mb"] for r in res["runs"]],
                      "train peak, ckpt": [r["train_total_ckpt_mb"] for r in res["runs"]],
                      "train peak": [r["train_total_mb"] for r in res["runs"]]},
         title="memory (MB)", ylabel="MB", rotate=True)
    bars(step, names, {"step": [r["step_seconds"] for r in res["runs"]],
                       "step, ckpt": [r["step_seconds_ckpt"] for r in res["runs"]]},
         title="step time (s), own process", ylabel="s", rotate=True)
    bars(ppl, names, {"base": [r["base_test"]["perplexity"] if r.get("base_test") else None for r in res["runs"]],
                      "adapted": [r["test"]["perplexity"] for r in res["runs"]]},
         title="test perplexity", ylabel="perplexity", rotate=True)
    save(fig, path)


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="training steps of every configuration (same batches)")
    p.add_argument("--ckpt-steps", type=int, default=4, help="further steps with gradient checkpointing on")
    p.add_argument("--rounds", type=int, default=10, help="alternating timing rounds per base precision")
    p.add_argument("--eval-examples", type=int, default=48, help="validation and test examples evaluated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "qlora.json"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    res = {"steps": a.steps, "ckpt_steps": a.ckpt_steps, "rounds": a.rounds, "eval_examples": a.eval_examples,
           "threads": a.threads, "lora_lr": LORA_LR, "peqa_lrs": PEQA_LRS, "malloc_env": MALLOC_ENV,
           "versions": {**versions(), "bitsandbytes": _bnb_version()}, **measure(a)}
    res["targets"] = targets(res)
    res["seconds"] = round(time.perf_counter() - started, 1)
    return write_outputs(Path(a.out), res, markdown, plot, indent=1)


if __name__ == "__main__":
    main()
