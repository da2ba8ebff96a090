"""SaRA vs LoRA vs full fine-tuning on the offline MiniLM + fortunes task, side by side in one run.

All three train through `unipeft.train.train_run` on examples/fortunes_lora.yaml (same 8
categories, caps and split: data.seed 0), one torch thread, the same number of steps, for
each of the seeds. Per method it reports test accuracy (mean and per seed), the step time of
those runs, the peak training memory of a few steps measured in a child process (VmHWM above
the resident size after loading the model), and how far the mean-pooled MiniLM sentence
embeddings of unrelated held-out fortunes (categories the task never sees) drift from the
base model's: 1 - cosine similarity and relative L2 distance.

    python -m benchmarks.sara_repro [--seeds 0,1,2] [--max-steps N] [--only lora,sara,full] [--out PATH]

Writes benchmarks/results/sara_repro.json (or --out) and a PNG beside it, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
OUT = ROOT / "benchmarks" / "results" / "sara_repro.json"
HELD_OUT = ["art", "education", "medicine", "wisdom", "pets", "kids"]  # not among the task's categories
HELD_OUT_TEXTS = 240
TARGETS = "[query, key, value, dense]"  # the shipped LoRA config's targets, for SaRA too
SMALL_BATCH = 4  # a memory probe where activations weigh less than the trained state

VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "sara": ["--method", "{name: sara, ratio: 0.1, nuclear_weight: 1.0e-4, nuclear_every: 10, schedule: [0.5], "
                         f"target_modules: {TARGETS}}}", "--optimizer.lr", "3e-4"],
    "full": ["--method", "{name: full}", "--optimizer.lr", "5e-5"],
}


def overrides(name: str, seed: int, max_steps: int | None, out: Path | None = None,
              max_per_category: int | None = None) -> list[str]:
    """Config overrides of one run: the variant, the fixed split, the seed, one thread, the step count."""
    args = VARIANTS[name] + ["--data.seed", "0", "--seed", str(seed), "--threads", "1"]
    if max_steps is not None:
        args += ["--max_steps", str(max_steps)]
    if max_per_category is not None:  # fewer examples per topic: the smoke test's budget
        args += ["--data.max_per_category", str(max_per_category)]
    if out is not None:
        args += ["--output_dir", str(out)]
    return args


# ---- generalisation retained: embedding drift on unrelated text ---------------------------------
def held_out_texts(n: int = HELD_OUT_TEXTS) -> list[str]:
    """Fortunes of categories the task never trains on (seeded sample, at most 400 characters)."""
    from unipeft.data.fortunes import fortunes_dir, read_fortune_file

    texts = [t for c in HELD_OUT for t in read_fortune_file(fortunes_dir() / c) if len(t) <= 400]
    random.Random(0).shuffle(texts)
    return texts[:n]


def embed(encoder, batches) -> "torch.Tensor":
    """Mean-pooled last hidden states (the sentence-transformers pooling of all-MiniLM-L6-v2)."""
    import torch

    was = encoder.training
    encoder.eval()
    outs = []
    with torch.no_grad():
        for b in batches:
            h = encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append((h * m).sum(1) / m.sum(1))
    encoder.train(was)
    return torch.cat(outs)


def drift(base_emb, emb) -> dict[str, float]:
    """Mean (1 - cosine) and mean relative L2 distance between base and adapted embeddings."""
    import torch.nn.functional as F

    cos = F.cosine_similarity(base_emb, emb, dim=-1)
    rel = (emb - base_emb).norm(dim=-1) / base_emb.norm(dim=-1)
    return {"cosine_drift": float((1 - cos).mean()), "relative_l2": float(rel.mean())}


def make_drift_callback(batches, base_emb):
    """A trainer callback that measures the drift of the trained model at the end of training."""
    from unipeft.train import TrainerCallback

    class DriftProbe(TrainerCallback):
        result: dict[str, float] = {}

        def on_train_end(self, ctx) -> None:
            self.result = drift(base_emb, embed(ctx.model.bert, batches))

    return DriftProbe()


def encoded_held_out(cfg, n: int = HELD_OUT_TEXTS):
    """Tokenized held-out batches and the base model's embeddings of them."""
    from unipeft.train.models import load_base_model, load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    texts = held_out_texts(n)
    batches = [dict(tok(texts[i:i + 48], padding=True, truncation=True, max_length=cfg.data.max_length,
                        return_tensors="pt")) for i in range(0, len(texts), 48)]
    base = load_base_model(cfg.model, "classification", ["a", "b"], 0)
    return batches, embed(base.bert, batches), len(texts)


# ---- one training run ------------------------------------------------------------------------------
def run_one(name: str, seed: int, max_steps: int | None, workdir: Path, held,
            max_per_category: int | None = None) -> dict:
    """Train one variant under `seed`; test accuracy, timing and drift."""
    from unipeft.train import load_config, train_run

    cfg = load_config(CONFIG, overrides(name, seed, max_steps, workdir / f"{name}-{seed}", max_per_category))
    probe = make_drift_callback(held[0], held[1])
    start = time.perf_counter()
    summary = train_run(cfg, show_progress=False, log=lambda *_: None, callbacks=[probe])
    return {"accuracy": summary["test"]["accuracy"], "macro_f1": summary["test"]["macro_f1"],
            "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "step_seconds": summary["train_seconds"] / summary["steps"],
            "trainable_params": summary["trainable_params"], "wall_seconds": time.perf_counter() - start,
            **probe.result}


# ---- peak memory, in a child process ----------------------------------------------------------------
def probe_memory(name: str, steps: int, batch_size: int | None = None, checkpointing: bool = False,
                 max_per_category: int | None = None) -> None:
    """(child) Peak resident memory of adapting + `steps` training steps, above the loaded base model; prints JSON."""
    import torch

    from unipeft.data.batching import epoch_batches
    from unipeft.data.encode import collate
    from unipeft.data.sources import load_data

    from .memprobe import peak_mb_since, reset_peak
    from unipeft.core.hooks import TrainingHooks
    from unipeft.train import load_config
    from unipeft.train.callbacks import method_param_groups
    from unipeft.train.evaluate import loss_terms, model_inputs
    from unipeft.train.models import load_base_model, load_tokenizer
    from unipeft.train.optim import build_optimizer
    from unipeft.train.setup import RunParts

    torch.set_num_threads(1)
    extra = ["--batch_size", str(batch_size)] if batch_size else []
    cfg = load_config(CONFIG, overrides(name, 0, None, None, max_per_category) + extra)
    splits = load_data(cfg.task, cfg.data, cfg.data_seed)
    base = load_base_model(cfg.model, cfg.task, splits.label_names, cfg.seed)
    parts = RunParts(cfg, splits, load_tokenizer(cfg.model.name), base, cfg.method_config, splits.label_names)
    data = parts.encode("train")
    # The first batches the trainer itself takes (seed 0, length-grouped).
    order = epoch_batches(data.lengths, cfg.batch_size, cfg.seed, 0, cfg.data.group_by_length)[:steps]
    batches = [collate([data.rows[i] for i in idx], parts.pad_id) for idx in order]
    rss0 = reset_peak()  # base model and data loaded; nothing of the method exists yet
    model = cfg.strategy.apply(base)  # adapter structures (e.g. SaRA's indices) count
    if checkpointing:  # what the trainer's gradient_checkpointing option does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = build_optimizer(model, cfg.optimizer, method_param_groups(model))
    hooks = TrainingHooks(model, opt, max_steps=steps)  # SaRA: nuclear gradient and one re-selection
    model.train()
    times = []
    for b in batches:
        t0 = time.perf_counter()
        hooks.step_begin()
        loss = loss_terms(cfg.task, model(**model_inputs(b)).logits, b["labels"]).mean()
        loss.backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.step_end()
        times.append(time.perf_counter() - t0)
    peak_mb = peak_mb_since(rss0)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"peak_mb": peak_mb, "base_rss_mb": round(rss0 / 1024, 1),
                      "optimizer_state_mb": round(state / 2 ** 20, 1), "gradient_mb": round(grads / 2 ** 20, 1),
                      "batch_size": cfg.batch_size, "gradient_checkpointing": checkpointing,
                      "steps": steps, "tokens_per_batch": [int(b["input_ids"].numel()) for b in batches],
                      "probe_step_seconds": statistics.median(times[1:] or times)}))


def measure_memory(name: str, steps: int, batch_size: int | None = None, checkpointing: bool = False,
                   max_per_category: int | None = None) -> dict:
    """Run the memory probe of `name` in a fresh interpreter."""
    # glibc returns freed blocks above this size to the OS at once, so VmHWM tracks live tensors
    # instead of whatever the allocator happened to keep cached (same setting for every method).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "benchmarks.sara_repro", "--probe", name, "--probe-steps", str(steps)]
    if batch_size:
        cmd += ["--probe-batch", str(batch_size)]
    if checkpointing:
        cmd += ["--probe-checkpointing"]
    if max_per_category is not None:
        cmd += ["--max-per-category", str(max_per_category)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:  # show the child's error (e.g. memprobe's PeakResetError), not only its exit code
        raise RuntimeError(f"memory probe {name} {' '.join(cmd[5:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MEMORY_SETTINGS = {"memory": {}, "memory_batch4": {"batch_size": SMALL_BATCH},
                   "memory_checkpointing": {"checkpointing": True}}


def memory_probes(name: str, steps: int, max_per_category: int | None = None) -> dict:
    """The three memory settings: the task's batch, a small batch, the task's batch with gradient checkpointing."""
    return {key: measure_memory(name, steps, **kw, max_per_category=max_per_category)
            for key, kw in MEMORY_SETTINGS.items()}


# ---- main -------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    """The markdown table of the README section."""
    rows = ["| method | trainable params | test accuracy (mean ± sd) | peak train memory (MB): batch 16 / 4 / 16 with "
            "checkpointing | grads + optimizer state (MB) | step time (s) | embedding drift (1 - cos) | "
            "relative L2 drift |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["methods"].items():
        rows.append(f"| {name} | {r['trainable_params']:,} | {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f} | "
                    f"{r['memory']['peak_mb']:.0f} / {r['memory_batch4']['peak_mb']:.0f} / "
                    f"{r['memory_checkpointing']['peak_mb']:.0f} | "
                    f"{r['memory'].get('gradient_mb', 0) + r['memory'].get('optimizer_state_mb', 0):.1f} | "
                    f"{r['step_seconds_median']:.3f} | "
                    f"{r['cosine_drift_mean']:.4f} | {r['relative_l2_mean']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> Path | None:
    """Run every method under every seed, probe memory, write the JSON (+ PNG) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's 3 epochs")
    parser.add_argument("--only", default="lora,sara,full")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=8)
    parser.add_argument("--probe-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="re-run only the memory probes into the JSON")
    parser.add_argument("--out", type=Path, default=OUT, help="the result JSON (default benchmarks/results/"
                                                                "sara_repro.json); the PNG goes beside it")
    parser.add_argument("--max-per-category", type=int, default=None,
                        help="examples per topic (default: the config's 200; smaller only to check the script runs)")
    parser.add_argument("--held-out-texts", type=int, default=HELD_OUT_TEXTS,
                        help=f"unrelated fortunes for the embedding drift (default {HELD_OUT_TEXTS})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cap = args.max_per_category
    if args.probe:
        probe_memory(args.probe, args.probe_steps, args.probe_batch, args.probe_checkpointing, cap)
        return None
    if args.memory_only:
        results = json.loads(args.out.read_text())
        for n, m in results["methods"].items():
            m.update(memory_probes(n, args.probe_steps, cap))
        return finish(results, args.out)
    import torch
    torch.set_num_threads(1)
    from unipeft.train import load_config

    names, seeds = args.only.split(","), [int(s) for s in args.seeds.split(",")]
    held = encoded_held_out(load_config(CONFIG), args.held_out_texts)
    workdir = Path(tempfile.mkdtemp(prefix="sara-repro-"))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    started = time.perf_counter()
    try:
        for seed in seeds:  # interleaved, so the three methods share the machine's load alike
            for name in names:
                row = run_one(name, seed, args.max_steps, workdir, held, cap)
                row["load_avg_1min"] = os.getloadavg()[0]
                runs[name].append(row)
                print(name, seed, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    memory = {n: memory_probes(n, args.probe_steps, cap) for n in names}
    methods = {}
    for n in names:
        acc = [r["accuracy"] for r in runs[n]]
        methods[n] = {
            "overrides": VARIANTS[n], "trainable_params": runs[n][0]["trainable_params"],
            "accuracy_mean": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "step_seconds_median": statistics.median(r["step_seconds"] for r in runs[n]),
            "cosine_drift_mean": statistics.mean(r["cosine_drift"] for r in runs[n]),
            "relative_l2_mean": statistics.mean(r["relative_l2"] for r in runs[n]),
            **memory[n], "runs": runs[n]}
    results = {"config": str(CONFIG.relative_to(ROOT)), "seeds": seeds, "max_steps": args.max_steps,
               "max_per_category": cap,  # None: the config's
               "held_out_categories": HELD_OUT, "held_out_texts": held[2], "methods": methods,
               "torch_threads": 1, "torch": torch.__version__, "python": platform.python_version(),
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
               "wall_seconds": time.perf_counter() - started}
    return finish(results, args.out)


def finish(results: dict, out: Path = OUT) -> Path:
    """Evaluate the claims, write the JSON and the PNG beside it, print the table."""
    from .plots import png_path

    methods = results["methods"]
    if {"sara", "lora", "full"} <= set(methods):
        claims = {}
        for key in MEMORY_SETTINGS:
            m = {n: methods[n][key]["peak_mb"] for n in ("sara", "lora", "full")}
            claims[key] = {"sara_le_lora": m["sara"] <= m["lora"], "sara_le_60pct_full": m["sara"] <= 0.6 * m["full"],
                           "sara_over_full": m["sara"] / m["full"], "sara_over_lora": m["sara"] / m["lora"]}
        claims["sara_drift_lt_lora"] = methods["sara"]["cosine_drift_mean"] < methods["lora"]["cosine_drift_mean"]
        results["claims"] = claims
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path(out))
    print(table(results))
    print(json.dumps(results.get("claims", {}), indent=2))
    return out


def _spread(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot(results: dict, path: Path) -> Path:
    """Bars per method: accuracy, peak memory (three settings), trained state, step time and drift, to a PNG."""
    from .plots import bars, panels, save

    methods = results["methods"]
    names = list(methods)
    runs = {n: methods[n]["runs"] for n in names}
    seeds = results["seeds"]
    steps = f"{results['max_steps']} steps" if results["max_steps"] else "the config's epochs"
    fig, axes = panels(6, f"SaRA vs LoRA vs full fine-tuning, MiniLM + fortunes: seeds {seeds}, {steps}; "
                          f"error bars: sd over seeds")
    bars(axes[0], names, {"": [methods[n]["accuracy_mean"] for n in names]},
         {"": [methods[n]["accuracy_sd"] for n in names]}, "test accuracy", "accuracy", "{:.3f}")
    memory = {f"batch {methods[names[0]][k]['batch_size']}" + (", checkpointing" if "checkpointing" in k else ""):
              [methods[n][k]["peak_mb"] for n in names] for k in MEMORY_SETTINGS}
    bars(axes[1], names, memory, title="peak training memory above the loaded model", ylabel="MB")
    bars(axes[2], names, {"": [methods[n]["memory"].get("gradient_mb", 0) + methods[n]["memory"].get(
        "optimizer_state_mb", 0) for n in names]}, title="gradients + optimizer state", ylabel="MB",
         value_format="{:.1f}")
    bars(axes[3], names, {"": [methods[n]["step_seconds_median"] for n in names]},
         {"": [_spread(runs[n], "step_seconds") for n in names]}, "train step time (median over seeds)", "s",
         "{:.3f}")
    bars(axes[4], names, {"": [methods[n]["cosine_drift_mean"] for n in names]},
         {"": [_spread(runs[n], "cosine_drift") for n in names]}, "embedding drift on unrelated text",
         "1 - cosine similarity", "{:.4f}")
    bars(axes[5], names, {"": [methods[n]["relative_l2_mean"] for n in names]},
         {"": [_spread(runs[n], "relative_l2") for n in names]}, "embedding drift on unrelated text",
         "relative L2 distance", "{:.3f}")
    return save(fig, path)


if __name__ == "__main__":
    main()
