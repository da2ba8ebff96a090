"""Time to accuracy: the shipped LoRA job (examples/fortunes_lora.yaml) with unipeft vs the same job written
with peft.get_peft_model + transformers' Trainer, side by side in one invocation.

    python -m benchmarks.time_to_accuracy [--repeats N] [--every K] [--threads N] [--out PATH]

Both runs train on the same train/valid/test texts, tokenized by unipeft's data pipeline, with the
same LoRA (the config's r, alpha, dropout, target modules; the classifier trained in full), AdamW
with the config's learning rates (classifier group included), weight decay and warm-up + linear
schedule, epochs, batch size, length grouping (transformers 5's train_sampling_strategy="group_by_length",
formerly group_by_length=True), gradient clipping and torch threads. Every K optimizer
steps (and before the first) a callback measures test accuracy with the clock paused, so both time
axes are training time only. time_to_accuracy = the first training time at which unipeft's test
accuracy >= PEFT's final test accuracy; ratio = that / PEFT's total training time.

Writes benchmarks/results/time_to_accuracy.json (or --out) with .md and .png beside it.
--max-steps and --max-per-category shrink the budget, only to check the script runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
OUT = ROOT / "benchmarks" / "results" / "time_to_accuracy.json"
TARGET = 0.5
CLOCK_NOTE = ("training seconds: wall time since the trainer's on_train_begin, with every measurement evaluation "
              "(test split, every K optimizer steps) paused out; neither run evaluates anything else before its "
              "last step")


class Curve:
    """Test accuracy vs training time, measured with the clock paused."""

    def __init__(self, accuracy, every: int) -> None:
        self.accuracy, self.every = accuracy, every
        self.points: list[dict] = []
        self.start = self.paused = 0.0

    def begin(self, model) -> None:
        """Start the clock and measure the untrained model (step 0)."""
        self.start, self.paused = time.perf_counter(), 0.0
        self.measure(model, 0)

    def measure(self, model, step: int) -> None:
        """One point: training seconds so far (evaluations excluded) and test accuracy."""
        t0 = time.perf_counter()
        train_seconds = t0 - self.start - self.paused
        acc = self.accuracy(model)
        self.points.append({"step": step, "train_seconds": train_seconds, "test_accuracy": acc})
        self.paused += time.perf_counter() - t0

    def step_end(self, model, step: int, max_steps: int) -> None:
        """Measure every `every` steps and at the last."""
        if step % self.every == 0 or step == max_steps:
            self.measure(model, step)


def _config(budget: list[str], threads: int, workdir: Path):
    from unipeft.train import load_config

    # eval_every beyond the run: the only validation pass is the trainer's final one, after the last step.
    return load_config(CONFIG, budget + ["--threads", str(threads), "--eval_every", str(10 ** 9),
                                         "--output_dir", str(workdir / "unipeft")])


def encoded(cfg, names: tuple[str, ...]) -> tuple[list, object, list[str]]:
    """The named splits of the config's data, tokenized by unipeft's pipeline; the tokenizer; the label names."""
    from unipeft.data.encode import encode_split
    from unipeft.data.sources import load_data
    from unipeft.train.models import load_tokenizer

    splits = load_data(cfg.task, cfg.data, cfg.data_seed)
    tok = load_tokenizer(cfg.model.name)
    return [encode_split(tok, splits.get(s), cfg.data.max_length) for s in names], tok, splits.label_names


def _test_accuracy(cfg, test_set, pad_id: int, num_labels: int):
    """accuracy(model) on the test split: unipeft's evaluation code for both libraries."""
    from unipeft.train.evaluate import evaluate

    def accuracy(model) -> float:
        return evaluate(model, test_set, cfg.task, cfg.eval_batch_size, pad_id, num_labels)["accuracy"]
    return accuracy


def run_unipeft(cfg, every: int) -> dict:
    """The shipped config through unipeft.train.train_run, with a curve callback."""
    from unipeft.train import TrainerCallback, train_run

    (test,), tok, labels = encoded(cfg, ("test",))  # the run encodes its own splits, identically
    curve = Curve(_test_accuracy(cfg, test, int(tok.pad_token_id), len(labels)), every)

    class CurveCallback(TrainerCallback):
        def on_train_begin(self, ctx) -> None:
            curve.begin(ctx.model)

        def on_step_end(self, ctx) -> None:
            curve.step_end(ctx.model, ctx.step, ctx.max_steps)

    t0 = time.perf_counter()
    summary = train_run(cfg, show_progress=False, callbacks=[CurveCallback()], log=lambda *_: None, overwrite=True)
    return {"curve": curve.points, "steps": summary["steps"], "trainable_params": summary["trainable_params"],
            "train_seconds": curve.points[-1]["train_seconds"],
            "final_test_accuracy": curve.points[-1]["test_accuracy"],
            "unipeft_summary_train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0}


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then linear decay to 0: the same formula as unipeft's `schedule: linear` (train/optim.py)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 1.0 - min(1.0, (step - warmup) / max(1, total - warmup))
    return factor


def peft_job(cfg, threads: int, workdir: Path):
    """(trainer, test set, pad id, label count): the job written with peft + transformers' Trainer."""
    import math

    import peft
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from unipeft.train.models import load_base_model

    torch.set_num_threads(threads)
    (train, test), tok, labels = encoded(cfg, ("train", "test"))
    m = cfg.method
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=m["r"], lora_alpha=m["alpha"], lora_dropout=m["dropout"],
                           target_modules=list(m["target_modules"]))  # SEQ_CLS: the classifier is modules_to_save
    model = peft.get_peft_model(load_base_model(cfg.model, cfg.task, labels, cfg.seed), lora)
    o = cfg.optimizer
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups, taken = [], set()
    for g in o.groups:  # first matching pattern wins, as in the unipeft config
        params = [p for n, p in named if re.search(g.params, n) and n not in taken]
        taken |= {n for n, _ in named if re.search(g.params, n)}
        groups.append({"params": params, "lr": g.lr if g.lr is not None else o.lr * (g.lr_scale or 1.0),
                       "weight_decay": o.weight_decay if g.weight_decay is None else g.weight_decay})
    groups.insert(0, {"params": [p for n, p in named if n not in taken], "lr": o.lr, "weight_decay": o.weight_decay})
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    total = cfg.max_steps or math.ceil(cfg.epochs * (len(train) // cfg.batch_size))
    warmup = cfg.schedule.warmup_steps or math.ceil(cfg.schedule.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))
    args = TrainingArguments(
        output_dir=str(workdir / "peft"), per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, max_grad_norm=cfg.max_grad_norm,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        dataloader_drop_last=True, eval_strategy="no", save_strategy="no", logging_steps=cfg.log_every,
        report_to="none", disable_tqdm=True, use_cpu=True, seed=cfg.seed, remove_unused_columns=False,
        learning_rate=o.lr, weight_decay=o.weight_decay)  # the optimizer passed in is what is used
    trainer = Trainer(model=model, args=args, train_dataset=train.rows, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok, optimizers=(opt, sched))
    return trainer, test, int(tok.pad_token_id), len(labels)


def run_peft(cfg, threads: int, every: int, workdir: Path) -> dict:
    """The same job with peft + Trainer, with a transformers TrainerCallback for the curve."""
    from transformers import TrainerCallback

    t0 = time.perf_counter()
    trainer, test, pad_id, num_labels = peft_job(cfg, threads, workdir)
    curve = Curve(_test_accuracy(cfg, test, pad_id, num_labels), every)

    class CurveCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            curve.begin(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            curve.step_end(model, state.global_step, state.max_steps)

    trainer.add_callback(CurveCallback())
    trainer.train()
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    return {"curve": curve.points, "steps": trainer.state.global_step, "trainable_params": int(trainable),
            "train_seconds": curve.points[-1]["train_seconds"],
            "final_test_accuracy": curve.points[-1]["test_accuracy"],
            "wall_seconds": time.perf_counter() - t0}


def crossing(ours: dict, theirs: dict) -> dict:
    """When our curve first reaches their final accuracy, as a fraction of their training time, with the
    interval between our previous measurement and that one (the crossing lies in it)."""
    goal, total = theirs["final_test_accuracy"], theirs["train_seconds"]
    pts = ours["curve"]
    k = next((i for i, p in enumerate(pts) if p["test_accuracy"] >= goal), None)
    if k is None:
        return {"goal_accuracy": goal, "seconds": None, "ratio": None, "band": None}
    t, prev = pts[k]["train_seconds"], pts[k - 1]["train_seconds"] if k else 0.0
    return {"goal_accuracy": goal, "seconds": t, "step": pts[k]["step"], "ratio": t / total,
            "band": [prev / total, t / total]}


def summarize(repeats: list[dict], every: int) -> dict:
    """The time-to-accuracy ratio over repeats (median) and its band (the widest resolution interval), judged."""
    from .stats import verdict

    per = [crossing(r["unipeft"], r["peft"]) for r in repeats]
    reached = [c for c in per if c["ratio"] is not None]
    out = {"per_repeat": per, "target": TARGET, "band_kind": f"evaluation interval ({every} steps)"
           + (f", widest over {len(repeats)} repeats" if len(repeats) > 1 else ", one run each")}
    if len(reached) < len(per):
        return {**out, "ratio": None, "band": None, "verdict": "missed",
                "note": "unipeft's test accuracy never reached PEFT's final accuracy in some repeat"}
    band = [min(c["band"][0] for c in per), max(c["band"][1] for c in per)]
    return {**out, "ratio": statistics.median(c["ratio"] for c in per), "band": band, "verdict": verdict(band, TARGET)}


def markdown(res: dict) -> str:
    """The report: the metric, its band and verdict, and each run's totals."""
    t = res["time_to_accuracy"]
    fig = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f} [{t['band'][0]:.3f}, {t['band'][1]:.3f}]"
    out = [f"# Time to accuracy: unipeft vs peft + Trainer ({res['config']})", "",
           f"{res['threads']} torch threads; evaluation every {res['every']} optimizer steps; {CLOCK_NOTE}.", "",
           f"time to PEFT's final test accuracy / PEFT's training time: **{fig}** (target <= {TARGET}; band: "
           f"{t['band_kind']}) -> **{t['verdict']}**", "",
           "| repeat | library | steps | trainable params | training s | final test accuracy "
           "| reaches PEFT's final at s |",
           "|---|---|---|---|---|---|---|"]
    for i, (r, c) in enumerate(zip(res["repeats"], t["per_repeat"])):
        for lib in ("unipeft", "peft"):
            x = r[lib]
            at = "-" if lib == "peft" else "never" if c["seconds"] is None else \
                f"{c['seconds']:.1f} (step {c['step']})"
            out.append(f"| {i} | {lib} | {x['steps']} | {x['trainable_params']:,} | {x['train_seconds']:.1f} | "
                       f"{x['final_test_accuracy']:.3f} | {at} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> Path:
    """Both curves (test accuracy vs training seconds) per repeat, PEFT's final accuracy dashed."""
    from .plots import new_figure, save

    fig = new_figure(8.0, 5.0, f"Test accuracy vs training time (evaluation paused), {res['config']}")
    ax = fig.subplots()
    for i, r in enumerate(res["repeats"]):
        for k, lib in enumerate(("unipeft", "peft + Trainer")):
            pts = r["unipeft" if k == 0 else "peft"]["curve"]
            ax.plot([p["train_seconds"] for p in pts], [p["test_accuracy"] for p in pts], marker="o", markersize=3,
                    color=f"C{k}", alpha=1.0 if i == 0 else 0.5, label=lib if i == 0 else None)
        c = res["time_to_accuracy"]["per_repeat"][i]
        ax.axhline(c["goal_accuracy"], color="C1", ls="--", lw=1, label="PEFT's final accuracy" if i == 0 else None)
        if c["seconds"] is not None:
            ax.axvline(c["seconds"], color="C0", ls=":", lw=1, label="unipeft reaches it" if i == 0 else None)
    ax.set_xlabel("training seconds (measurement evaluations excluded)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Run both jobs (alternating order over repeats) and write the JSON, markdown and PNG."""
    from .fortunes_baselines import budget_overrides
    from .common import write_outputs
    from .run import choose_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="result JSON (default benchmarks/results/"
                                                                "time_to_accuracy.json); .md and .png go beside it")
    parser.add_argument("--every", type=int, default=10, help="optimizer steps between test measurements")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job, order alternating (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the physical cores)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the config's 3 epochs)")
    parser.add_argument("--max-per-category", type=int, default=None, help="examples per topic (default: 200)")
    args = parser.parse_args(argv)
    th = choose_threads(args.threads)
    budget = budget_overrides(args.max_steps, args.max_per_category)
    workdir = Path(tempfile.mkdtemp(prefix="tta-bench-"))
    started, load0 = time.time(), os.getloadavg()
    repeats = []
    try:
        for i in range(args.repeats):
            cfg = _config(budget, th["threads"], workdir)
            runs = {}
            for lib in (("unipeft", "peft") if i % 2 == 0 else ("peft", "unipeft")):
                print(f"[time_to_accuracy] repeat {i}: {lib}", flush=True)
                runs[lib] = run_unipeft(cfg, args.every) if lib == "unipeft" else \
                    run_peft(cfg, th["threads"], args.every, workdir)
            repeats.append({"order": list(runs), **runs})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from .common import versions

    res = {"config": str(CONFIG.relative_to(ROOT)), "model": "minilm", "every": args.every, "clock": CLOCK_NOTE,
           "threads": th["threads"], "thread_choice": th, "budget_overrides": budget, "repeats": repeats,
           "time_to_accuracy": summarize(repeats, args.every), "versions": versions(),
           "wall_seconds": round(time.time() - started, 1),
           "load_average_at_start_and_end": [load0, os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M")}
    r0 = repeats[0]
    res["unipeft_over_peft_training_seconds"] = statistics.median(
        r["unipeft"]["train_seconds"] / r["peft"]["train_seconds"] for r in repeats)
    res["same_trainable_params"] = r0["unipeft"]["trainable_params"] == r0["peft"]["trainable_params"]
    res["same_steps"] = r0["unipeft"]["steps"] == r0["peft"]["steps"]
    return write_outputs(args.out, res, markdown, plot)


if __name__ == "__main__":
    main()
