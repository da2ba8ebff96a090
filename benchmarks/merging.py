"""Merging and compressing fortunes LoRA adapters: merge methods, ComPEFT and LoRA extraction, decided on validation.

    python -m benchmarks.merging [--seeds 3] [--quick] [--out PATH] [--cache PATH] [--work DIR]

Setup. The data are examples/fortunes_lora.yaml's (8 topics, its caps, its split, seed 0 for every run).
Its topics are cut into 4 disjoint two-way tasks of related topics (TASKS: computers/science,
law/politics, food/love, sports/startrek), so each task is a real decision and a merge has four task
vectors to reconcile. The model is MiniLM with ONE shared 8-way head: per seed the head is fitted first
on frozen encoder features (a linear probe; lr from HEAD_GRID on validation) and is then part of the
frozen base of every adapter. Every adapter is a LoRA of the config (r 8, alpha 16, dropout 0.1,
query/key/value/dense) on the encoder alone, so adapters differ only in their task vectors and any merge
of them runs with the same head -- the multi-head task-arithmetic setup (one head per task, here the
task's rows of the shared head). A task adapter trains on its task's examples with cross-entropy over its
task's two topics; a task is scored by the argmax over its own topics on its test examples. The
multitask adapter trains on all tasks' data with the 8-way cross-entropy: it is also the default-task
adapter (the shipped config's task with the head frozen) that sections 3 and 4 use.
Sections. (1) training: the 4 task adapters share one lr, the multitask adapter has its own, each from
LORA_GRID by mean validation accuracy at seed 0 (ties: the smaller lr); seeds 1.. train at it.
(2) merges of the 4 task adapters: every method of MERGES, its weight scale lambda (and nothing else)
chosen per seed by mean validation task accuracy from its declared grid; aTLAS learns its coefficients on
ATLAS["batches"] validation batches. (3) ComPEFT of the multitask adapter at DENSITIES: compression ratio
and 8-way test accuracy drop. (4) LoRA extraction at RANKS from a full fine-tune proxy of the default
task (every weight matrix the LoRA targets, 37 Linears; biases, LayerNorms, embeddings and head frozen;
lr from FULL_GRID on validation at seed 0): 8-way test accuracy relative to the fine-tune.
ComPEFT uses compress_adapter's default scale (mean |value| of the kept entries, nothing to tune).
Budget: the config's 3 epochs of batch 16 per training run, one torch thread; about 35 min for 3 seeds on
a quiet machine (estimated from measured step and evaluation times: ~0.4 s a step, ~4 s a validation
pass; not yet timed end to end). --quick: 1 seed, 2 steps of 4 per run, 10 entries per topic, LoRA on
the last layer only, one point per grid (the smoke test, ~25 s).
Training runs and merge results are cached by key (JSON lines, adapters in --work), so a run continues.
benchmarks/merging_report.py turns the rows into the tables, findings and PNG.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "examples" / "fortunes_lora.yaml"
TASKS = {"computers-science": ("computers", "science"), "law-politics": ("law", "politics"),
         "food-love": ("food", "love"), "sports-startrek": ("sports", "startrek")}
LORA_GRID = [3e-4, 1e-3, 3e-3]
FULL_GRID = [3e-5, 1e-4]
HEAD_GRID, HEAD_STEPS = [1e-2, 3e-2, 1e-1], 300  # full-batch AdamW on the frozen pooled features
SUM_GRID = [0.3, 0.6, 1.0]   # lambda of sum-type merges: lambda x sum of the (pruned) task vectors
MEAN_GRID = [0.7, 1.0, 1.5]  # lambda of mean-type merges (disjoint / balanced averages)
SVD_RANK = 32  # weight-space forms: the 4 sources' total rank, so a plain sum is written without loss
# name -> (merge_adapters method, lambda grid, parameters). Densities are the papers' common settings.
MERGES = {
    "task_arithmetic": ("cat", SUM_GRID, {}),  # exact lambda * sum of B_k A_k (rank 32)
    "svd_rank8": ("svd", SUM_GRID, {"svd_rank": 8}),  # the same sum, truncated to one adapter's rank
    "linear": ("linear", SUM_GRID, {}),  # PEFT's factor-space sum of the A's and of the B's
    "ties": ("ties", MEAN_GRID, {"density": 0.2}),
    "ties_svd": ("ties_svd", MEAN_GRID, {"density": 0.2, "svd_rank": SVD_RANK}),
    "dare_ties": ("dare_ties", MEAN_GRID, {"density": 0.5, "seed": 0}),  # seed: replaced by the run's seed
    "dare_ties_svd": ("dare_ties_svd", MEAN_GRID, {"density": 0.5, "seed": 0, "svd_rank": SVD_RANK}),
    "magnitude_prune": ("magnitude_prune", SUM_GRID, {"density": 0.5}),
    "magnitude_prune_svd": ("magnitude_prune_svd", SUM_GRID, {"density": 0.5, "svd_rank": SVD_RANK}),
    "pcb": ("pcb", MEAN_GRID, {"ratio": 0.2}),
    "pcb_svd": ("pcb_svd", MEAN_GRID, {"ratio": 0.2, "svd_rank": SVD_RANK}),
}
ATLAS = {"batches": 4, "batch_size": 16, "steps": 50, "lr": 1e-2}  # init: 1/K per block (atlas_merge's)
DENSITIES = [0.05, 0.1, 0.2, 0.5]
RANKS = [4, 8, 16, 32, 64]
QUICK = {"budget": ["--max_steps", "2", "--data.max_per_category", "10", "--batch_size", "4",
                    "--method.layers_to_transform", "[5]"], "lora": [1e-3], "full": [1e-4],
         "head": [3e-2], "head_steps": 20, "grid": [1.0], "atlas_steps": 2, "densities": [0.1, 0.5],
         "ranks": [4, 8]}
SVD_FAST = {"svd_full_matrices": False}  # the same leading factors, without the full U


class Runs:
    """Finished work by key: rows in a JSON-lines file, tensors in a folder (a row whose files are gone reruns)."""

    def __init__(self, path: Path, work: Path) -> None:
        self.path, self.work = path, work
        lines = path.read_text().splitlines() if path.exists() else []
        self.done = {e["key"]: e["row"] for e in map(json.loads, filter(str.strip, lines))}
        self.counts = {"trained": 0, "reused": 0}

    def folder(self, key: str) -> Path:
        """The folder holding `key`'s tensors."""
        return self.work / hashlib.sha1(key.encode()).hexdigest()[:16]

    def get(self, key: str, make, keeps_files: bool = False) -> dict:
        """The row of `key`, from the cache or from make(folder) (appended to the cache)."""
        folder = self.folder(key)
        if key in self.done and (not keeps_files or folder.exists()):
            self.counts["reused"] += 1
            return self.done[key]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        row = make(folder)
        if not keeps_files:
            shutil.rmtree(folder, ignore_errors=True)
        self.done[key] = row
        self.counts["trained"] += 1
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "row": row}) + "\n")
        return row


class Bench:
    """The data, tokenizer and settings every section shares."""

    def __init__(self, budget: list[str], quick: bool) -> None:
        from unipeft.data.encode import encode_split
        from unipeft.data.sources import load_data
        from unipeft.train import load_config
        from unipeft.train.models import load_tokenizer

        self.cfg = load_config(CONFIG, budget)
        self.budget, self.quick = budget, quick
        splits = load_data(self.cfg.task, self.cfg.data, self.cfg.data_seed)
        self.labels = splits.label_names
        tok = load_tokenizer(self.cfg.model.name)
        self.pad = int(tok.pad_token_id)
        self.sets = {s: encode_split(tok, splits.get(s), self.cfg.data.max_length) for s in ("train", "valid", "test")}
        self.task_labels = {t: [self.labels.index(c) for c in cats] for t, cats in TASKS.items()}
        self.sizes = {s: len(v) for s, v in self.sets.items()}
        self.features: dict = {}  # computed once per process: pooled features, the LoRA's sites

    def rows(self, split: str, task: str | None = None) -> list[dict]:
        """The encoded rows of `split` (of one task's topics when `task` is given)."""
        rows = self.sets[split].rows
        return rows if task is None else [r for r in rows if r["labels"] in self.task_labels[task]]

    def key(self, *parts) -> str:
        """A cache key: what decides a result, with the budget and the config."""
        return json.dumps([str(CONFIG.relative_to(ROOT)), self.budget, *parts])


# ---- the model, training and scoring ----------------------------------------------------------

def logits_of(model, rows: list[dict], bench: Bench, width: int | None = None) -> torch.Tensor:
    """Logits (n, width or 8) of `rows` in their order (evaluation mode, batches sorted by length)."""
    from unipeft.data.encode import collate

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    out = torch.empty(len(rows), width or len(bench.labels))
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), bench.cfg.eval_batch_size):
            idx = order[s:s + bench.cfg.eval_batch_size]
            batch = collate([rows[i] for i in idx], bench.pad)
            batch.pop("labels")
            out[idx] = model(**batch).logits.float()
    model.train(was)
    return out


def scores(logits: torch.Tensor, rows: list[dict], bench: Bench) -> dict:
    """8-way accuracy and each task's accuracy (argmax over its own topics, on its examples)."""
    y = torch.tensor([r["labels"] for r in rows])
    out = {"accuracy": float((logits.argmax(-1) == y).float().mean()), "tasks": {}}
    for t, labs in bench.task_labels.items():
        mask = torch.isin(y, torch.tensor(labs))
        if not mask.any():
            continue
        pred = torch.tensor(labs)[logits[mask][:, labs].argmax(-1)]
        out["tasks"][t] = float((pred == y[mask]).float().mean())
    out["task_mean"] = sum(out["tasks"].values()) / len(out["tasks"])
    return out


def evaluate(model, bench: Bench, split: str, task: str | None = None) -> dict:
    """scores() of `model` on a split (its `task` examples only, when given)."""
    rows = bench.rows(split, task)
    return scores(logits_of(model, rows, bench), rows, bench)


def restricted_loss(logits: torch.Tensor, labels: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """Mean cross-entropy over the `allowed` topics only (labels are among them)."""
    pos = torch.full((logits.shape[-1],), -1, dtype=torch.long)
    pos[torch.tensor(allowed)] = torch.arange(len(allowed))
    return torch.nn.functional.cross_entropy(logits[:, allowed].float(), pos[labels])


def fit(model, bench: Bench, rows: list[dict], lr: float, seed: int, allowed: list[int]) -> dict:
    """The config's training recipe (AdamW, warm-up + linear decay, clipping, length-grouped batches)."""
    from unipeft.data.batching import epoch_batches
    from unipeft.data.encode import collate
    from unipeft.train.optim import build_scheduler

    cfg = bench.cfg
    if len(rows) < cfg.batch_size:
        raise ValueError(f"{len(rows)} training examples, fewer than batch_size={cfg.batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * (len(rows) // cfg.batch_size)))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optimizer.weight_decay)
    sched = build_scheduler(opt, cfg.schedule, steps)
    lengths = [len(r["input_ids"]) for r in rows]
    model.train()
    step, epoch, start, losses = 0, 0, time.perf_counter(), []
    while step < steps:
        for batch_idx in epoch_batches(lengths, cfg.batch_size, seed, epoch, cfg.data.group_by_length):
            batch = collate([rows[i] for i in batch_idx], bench.pad)
            labels = batch.pop("labels")
            loss = restricted_loss(model(**batch).logits, labels, allowed)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return {"steps": steps, "train_seconds": round(time.perf_counter() - start, 1), "final_loss": losses[-1]}


def head_row(bench: Bench, runs: Runs, seed: int, grid: list[float], steps: int) -> dict:
    """The shared head of `seed`: a linear probe on frozen pooled features, lr chosen on validation."""
    def make(folder: Path) -> dict:
        from safetensors.torch import save_file

        from unipeft.train.models import load_base_model
        model = load_base_model(bench.cfg.model, "classification", bench.labels, seed)
        width = model.classifier.in_features
        model.classifier = torch.nn.Identity()  # logits become the pooled output the head reads (dropout off)
        if "train" not in bench.features:  # the pretrained encoder and pooler: the same features for every seed
            bench.features.update({split: (logits_of(model, bench.rows(split), bench, width), torch.tensor(
                [r["labels"] for r in bench.rows(split)])) for split in ("train", "valid")})
        feats = bench.features
        torch.manual_seed(seed)
        init = torch.nn.Linear(feats["train"][0].shape[1], len(bench.labels)).state_dict()
        best, found = None, {}
        for lr in grid:
            head = torch.nn.Linear(*init["weight"].shape[::-1])
            head.load_state_dict(init)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=bench.cfg.optimizer.weight_decay)
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(head(feats["train"][0]), feats["train"][1])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                found[f"{lr:g}"] = float((head(feats["valid"][0]).argmax(-1) == feats["valid"][1]).float().mean())
            if best is None or found[f"{lr:g}"] > best[0]:
                best = (found[f"{lr:g}"], lr, {k: v.detach().clone() for k, v in head.state_dict().items()})
        save_file(best[2], str(folder / "head.safetensors"))
        return {"kind": "head", "seed": seed, "lr": best[1], "valid_accuracy": best[0], "grid": found}

    key = bench.key("head", seed, grid, steps)
    return {**runs.get(key, make, keeps_files=True), "_dir": str(runs.folder(key))}


def base_model(bench: Bench, seed: int, head: dict):
    """MiniLM with seed `seed`'s fitted shared head (the frozen base of every adapter)."""
    from safetensors.torch import load_file

    from unipeft.train.models import load_base_model
    model = load_base_model(bench.cfg.model, "classification", bench.labels, seed)
    model.classifier.load_state_dict(load_file(str(Path(head["_dir"]) / "head.safetensors")))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def adapter_row(bench: Bench, runs: Runs, base, seed: int, lr: float, task: str | None) -> dict:
    """One LoRA run (a task adapter, or the multitask one when task is None); the adapter stays in --work."""
    def make(folder: Path) -> dict:
        import unipeft as up
        k = 0 if task is None else 1 + list(TASKS).index(task)
        torch.manual_seed(1000 * seed + k)
        model = up.adapt(copy.deepcopy(base), bench.cfg.method_config)
        allowed = list(range(len(bench.labels))) if task is None else bench.task_labels[task]
        row = fit(model, bench, bench.rows("train", task), lr, seed, allowed)
        model.save_pretrained(folder)
        valid = evaluate(model, bench, "valid", task)
        return {"kind": "adapter", "task": task or "multitask", "lr": lr, "seed": seed, **row,
                "valid": valid, "test": evaluate(model, bench, "test", task),
                "score": valid["accuracy"] if task is None else valid["tasks"][task],
                "file_bytes": (folder / "adapter_model.safetensors").stat().st_size}

    row = runs.get(bench.key("adapter", task, lr, seed), make, keeps_files=True)
    return {**row, "_dir": str(runs.folder(bench.key("adapter", task, lr, seed)))}


def choose(rows: list[dict]) -> float:
    """The lr of the best mean validation score (ties: the smaller lr)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r["score"])
    return max(sorted(by_lr), key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


# ---- sections 2-4 --------------------------------------------------------------------------------

def with_adapters(base, dirs: dict[str, str]):
    """An AdaptedModel over a copy of `base` holding the saved adapters `dirs` (name -> folder)."""
    from unipeft import AdaptedModel

    names = list(dirs)
    model = AdaptedModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], names[0])
    for n in names[1:]:
        model.load_adapter(dirs[n], n)
    return model


def _scored(model, bench: Bench, name: str, split: str) -> dict:
    model.set_adapter(name)
    return evaluate(model, bench, split)


def merge_row(model, bench: Bench, seed: int, method: str, grid: list[float], params: dict) -> dict:
    """One merge method: each lambda of `grid` scored on validation (mean task accuracy), the best on test."""
    from unipeft.merge.adapters import WEIGHT_METHODS, merge_adapters

    params = {**params, **({"seed": seed} if "seed" in params else {}),
              **(SVD_FAST if method in WEIGHT_METHODS else {})}
    k, found, best = len(TASKS), {}, None
    for i, lam in enumerate(sorted(grid)):  # the best so far is kept, so it is never built twice
        name = merge_adapters(model, list(TASKS), [lam] * k, method=method, name=f"merged_{i}", **params)
        found[lam] = _scored(model, bench, name, "valid")
        if best is None or found[lam]["task_mean"] > found[best[0]]["task_mean"]:  # ties: the smaller lambda
            if best is not None:
                model.delete_adapter(best[1])
            best = (lam, name)
        else:
            model.delete_adapter(name)
    lam = best[0]
    test = _scored(model, bench, best[1], "test")
    model.delete_adapter(best[1])
    return {"lambda": lam, "grid": {f"{x:g}": found[x]["task_mean"] for x in grid}, "valid": found[lam],
            "test": test}


def atlas_row(model, bench: Bench, seed: int, steps: int) -> dict:
    """aTLAS on a seeded sample of validation batches; the loss of each example is over its task's topics."""
    from unipeft.data.encode import collate
    from unipeft.merge.atlas import atlas_merge

    rows = bench.rows("valid")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    size = min(ATLAS["batch_size"], len(rows))
    batches = [collate([rows[i] for i in order[s:s + size]], bench.pad)
               for s in range(0, min(len(rows), ATLAS["batches"] * size) - size + 1, size)]
    allowed = torch.zeros(len(bench.labels), len(bench.labels), dtype=torch.bool)
    for labs in bench.task_labels.values():
        allowed[torch.tensor(labs).unsqueeze(1), torch.tensor(labs)] = True

    def loss_fn(out, batch):
        logits = out.logits.float().masked_fill(~allowed[batch["labels"]], float("-inf"))
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    name, coefs = atlas_merge(model, list(TASKS), batches, name="merged", steps=steps, lr=ATLAS["lr"],
                              loss_fn=loss_fn, seed=seed)
    mean = torch.stack(list(coefs.values())).mean(0).tolist()
    row = {"valid": _scored(model, bench, name, "valid"), "test": _scored(model, bench, name, "test"),
           "mean_coefficient": dict(zip(TASKS, mean)), "batches": len(batches), "steps": steps}
    model.delete_adapter(name)
    return row


def compression_rows(model, bench: Bench, adapter_dir: str, densities: list[float], work: Path) -> dict:
    """ComPEFT of the multitask adapter at each density: sizes (the compressor's summary) and 8-way scores."""
    from unipeft.compress.compeft import compress_adapter, load_compressed

    out = {}
    for d in densities:
        target = work / f"compeft-{d:g}"
        summary = compress_adapter(adapter_dir, target, d)
        load_compressed(model, target, "compressed")
        errors = [t["task_rel_error"] for t in summary["tensors"].values() if t["kind"] == "ternary"]
        out[f"{d:g}"] = {"summary": {**_plain(summary), "mean_task_rel_error": sum(errors) / max(1, len(errors))},
                         "test": _scored(model, bench, "compressed", "test")}
        model.delete_adapter("compressed")
    return out


def _plain(summary: dict) -> dict:
    """The JSON-ready numbers and strings of a summary."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


def lora_sites(bench: Bench, base) -> list[str]:
    """The module paths the config's LoRA adapts (the proxy fine-tunes and the extraction reads these)."""
    if "sites" not in bench.features:
        import unipeft as up
        bench.features["sites"] = [d.path for d in up.adapt(copy.deepcopy(base), bench.cfg.method_config).deltas(
            "default")]
    return bench.features["sites"]


def full_row(bench: Bench, runs: Runs, base, seed: int, lr: float) -> dict:
    """The full fine-tune proxy at `lr`: every weight matrix the LoRA targets trains (kept in --work)."""
    def make(folder: Path) -> dict:
        from safetensors.torch import save_file

        torch.manual_seed(1000 * seed + 99)
        tuned = copy.deepcopy(base)
        weights = {f"{path}.weight" for path in lora_sites(bench, base)}
        for n, p in tuned.named_parameters():
            p.requires_grad_(n in weights)
        row = fit(tuned, bench, bench.rows("train"), lr, seed, list(range(len(bench.labels))))
        save_file({n: p.detach() for n, p in tuned.named_parameters() if p.requires_grad},
                  str(folder / "tuned.safetensors"))
        valid = evaluate(tuned, bench, "valid")
        return {"kind": "full", "task": "default", "lr": lr, "seed": seed, **row, "valid": valid,
                "test": evaluate(tuned, bench, "test"), "score": valid["accuracy"],
                "trainable_params": sum(p.numel() for p in tuned.parameters() if p.requires_grad)}

    key = bench.key("full", lr, seed)
    return {**runs.get(key, make, keeps_files=True), "_dir": str(runs.folder(key))}


def extraction_rows(bench: Bench, runs: Runs, base, full: dict, ranks: list[int]) -> dict:
    """LoRA extracted from a full fine-tune at each rank: the extractor's summary and 8-way test scores."""
    def make(folder: Path) -> dict:
        from safetensors.torch import load_file

        from unipeft import AdaptedModel
        from unipeft.compress.extract import extract_lora

        tuned = copy.deepcopy(base)
        tuned.load_state_dict(load_file(str(Path(full["_dir"]) / "tuned.safetensors")), strict=False)
        out = {}
        for r in ranks:
            summary = extract_lora(base, tuned, folder / f"lora-{r}", r,
                                   target_modules=lora_sites(bench, base), progress=False)
            model = AdaptedModel.from_pretrained(copy.deepcopy(base), folder / f"lora-{r}", "extracted")
            errors = [v["rel_error"] for v in summary["layers"].values()]
            out[str(r)] = {"summary": {**_plain(summary), "mean_rel_error": sum(errors) / len(errors),
                                       "layers": len(errors)}, "test": evaluate(model, bench, "test")}
        return out

    return runs.get(bench.key("extract", full["lr"], full["seed"], ranks), make)


def seed_section(bench: Bench, runs: Runs, seed: int, heads: dict, lrs: dict, q: dict) -> dict:
    """Everything measured with one seed's adapters."""
    base = base_model(bench, seed, heads[seed])
    rows = {t: adapter_row(bench, runs, base, seed, lrs["task"], t) for t in TASKS}
    multi = adapter_row(bench, runs, base, seed, lrs["multitask"], None)
    sources = {t: r["_dir"] for t, r in rows.items()}
    key = [Path(d).name for d in [*sources.values(), multi["_dir"]]]  # the adapters' cache folders

    def merged(folder: Path) -> dict:
        model = with_adapters(base, {**sources, "multitask": multi["_dir"]})
        out = {n: merge_row(model, bench, seed, m, q.get("grid") or g, p) for n, (m, g, p) in MERGES.items()}
        out["atlas"] = atlas_row(model, bench, seed, q.get("atlas_steps") or ATLAS["steps"])
        out["_compression"] = compression_rows(model, bench, multi["_dir"], q.get("densities") or DENSITIES,
                                               folder)
        return out

    m = runs.get(bench.key("merges", seed, key, MERGES, ATLAS, q), merged)
    return {"seed": seed, "head": heads[seed], "base": evaluate(base, bench, "test"),
            "individual": {t: r["test"] for t, r in rows.items()}, "multitask": multi["test"],
            "multitask_bytes": multi["file_bytes"], "merges": {k: v for k, v in m.items() if k != "_compression"},
            "compression": m["_compression"]}


def run(bench: Bench, runs: Runs, seeds: int, q: dict, log=print) -> dict:
    """Select on seed 0's validation scores, then measure every seed; the rows the report reads."""
    heads = {s: head_row(bench, runs, s, q.get("head") or HEAD_GRID, q.get("head_steps") or HEAD_STEPS)
             for s in range(seeds)}
    base = base_model(bench, 0, heads[0])
    grid = [adapter_row(bench, runs, base, 0, lr, t) for lr in q.get("lora") or LORA_GRID for t in [*TASKS, None]]
    lrs = {"task": choose([r for r in grid if r["task"] != "multitask"]),
           "multitask": choose([r for r in grid if r["task"] == "multitask"])}
    log(f"chosen lr: task adapters {lrs['task']:g}, multitask {lrs['multitask']:g}")
    full = [full_row(bench, runs, base, 0, lr) for lr in q.get("full") or FULL_GRID]
    lrs["full"] = choose(full)
    per_seed = []
    for s in range(seeds):
        per_seed.append(seed_section(bench, runs, s, heads, lrs, q))
        base = base_model(bench, s, heads[s])
        fs = full_row(bench, runs, base, s, lrs["full"])
        per_seed[-1]["full"] = {**{k: fs[k] for k in ("test", "valid", "trainable_params", "lr")},
                                "ranks": extraction_rows(bench, runs, base, fs, q.get("ranks") or RANKS)}
        log(f"seed {s}: done ({runs.counts['trained']} computed, {runs.counts['reused']} reused so far)")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("_")}  # noqa: E731
    return {"per_seed": per_seed, "lrs": lrs, "selection": [strip(r) for r in grid + full]}


def main(argv: list[str] | None = None) -> Path:
    """Train, merge, compress, extract; write the JSON + markdown + PNG."""
    from . import merging_report as report
    from .common import versions, write_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 steps of 4 a run, 10 entries per topic, "
                                                              "one point per grid (a smoke test, < 60 s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "merging.json")
    parser.add_argument("--cache", type=Path, help="finished work as JSON lines (default: OUT with .runs.jsonl)")
    parser.add_argument("--work", type=Path, help="adapters of finished runs (default: runs/bench-merging)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    q = dict(QUICK) if args.quick else {}
    seeds = 1 if args.quick else args.seeds
    work = args.work or ROOT / "runs" / "bench-merging"
    work.mkdir(parents=True, exist_ok=True)
    runs = Runs(args.cache or args.out.with_suffix(".runs.jsonl"), work)
    start = time.perf_counter()
    bench = Bench(q.get("budget", []), args.quick)
    res = run(bench, runs, seeds, q)
    res.update({"config": str(CONFIG.relative_to(ROOT)), "seeds": seeds, "quick": args.quick,
                "budget": bench.budget, "examples": bench.sizes, "tasks": {t: list(c) for t, c in TASKS.items()},
                "declared": {"lora_grid": q.get("lora") or LORA_GRID, "full_grid": q.get("full") or FULL_GRID,
                             "head_grid": q.get("head") or HEAD_GRID, "merges": {n: {"method": m, "grid": q.get(
                                 "grid") or g, "params": p} for n, (m, g, p) in MERGES.items()},
                             "atlas": {**ATLAS, "steps": q.get("atlas_steps") or ATLAS["steps"]},
                             "densities": q.get("densities") or DENSITIES, "ranks": q.get("ranks") or RANKS},
                "seconds": round(time.perf_counter() - start, 1), "runs_computed": runs.counts["trained"],
                "runs_reused": runs.counts["reused"], "date": time.strftime("%Y-%m-%d %H:%M"),
                "torch_threads": 1, **versions()})
    res.update(report.summarise(res))
    return write_outputs(args.out, res, report.markdown, report.plot)


if __name__ == "__main__":
    main()
