"""`train_run`: one complete run, written atomically.

The run is built in `<output_dir>.partial/` (config.yaml, metrics.jsonl, checkpoints/) and
renamed to `<output_dir>` only once the adapter, the test metrics and summary.json are
written, so a crashed run never looks complete. Every input is validated (config, data,
model, targets, optimizer groups) before anything is written.

With FSDP (`distributed.strategy: fsdp`, or an FSDP launch under the default 'auto'), the
adapted model is sharded (train/fsdp.py) after the adapters are injected and before the
optimizer is built; the adapter is gathered whole to be saved.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import ConfigError
from .callbacks import TrainerCallback
from .checkpoint import list_checkpoints
from .config import RunConfig
from .fsdp import (FsdpOptions, check_deepspeed, check_method, check_saveable, every_process_loads, local_sizes,
                   require_processes, resolve_strategy, shard_model, whole_trainable)
from .setup import RunParts, build_parts
from .threads import apply_threads

SUMMARY = "summary.json"


def partial_dir(output_dir: str | Path) -> Path:
    """Where a run in progress (or a crashed one, for --resume) lives."""
    out = Path(output_dir)
    return out.with_name(out.name + ".partial")


def make_accelerator() -> Any:
    """An Accelerator for this launch: one process, or torchrun/accelerate launch (DDP or FSDP; DeepSpeed refused).

    accelerate's own FSDP plugin is not used (on CPU processes it does not engage at all):
    train_run shards the model itself (train/fsdp.py) and never hands it to accelerate.prepare.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    check_deepspeed()  # before accelerate reads the launch's DeepSpeed config
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed launches are refused: unipeft does not gather DeepSpeed's partitioned adapter "
                          "and optimizer state; use FSDP (accelerate launch --use_fsdp --fsdp_version 2)")
    return acc


def _check_output(cfg: RunConfig, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber finished or crashed runs by accident; return the checkpoint to resume from."""
    out, part = Path(cfg.output_dir), partial_dir(cfg.output_dir)
    if resume:
        ckpts = list_checkpoints(part / "checkpoints")
        if not ckpts:
            done = " (output_dir holds a finished run)" if (out / SUMMARY).exists() else ""
            raise ConfigError(f"--resume: no checkpoint in {part}/checkpoints{done}; checkpoints are written "
                              f"every save_every steps")
        if out.exists() and not overwrite:
            raise ConfigError(f"--resume: output_dir {out} exists too; add --overwrite to replace it when the "
                              f"resumed run finishes")
        saved, now = yaml.safe_load((part / "config.yaml").read_text()), cfg.to_dict()
        defaults = RunConfig().to_dict()  # a key an older run's config.yaml lacks had its default value
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))
        if changed:
            raise ConfigError(f"--resume: the config differs from the interrupted run's in {changed}; "
                              f"resume with the same config (see {part}/config.yaml)")
        return ckpts[-1]
    if out.exists() and not overwrite:
        raise ConfigError(f"output_dir {out} already exists; pass --overwrite or choose another output_dir")
    if part.exists() and not overwrite:
        raise ConfigError(f"{part} holds an interrupted run; pass --resume to continue it or --overwrite to "
                          f"start over")
    return None


def _save_final(parts: RunParts, model: Any, run_dir: Path) -> None:
    """The trained weights: PEFT-format adapter/ for adapter methods, trainable.safetensors for 'full'."""
    parts.cfg.strategy.save(model, run_dir)


def _shard(parts: RunParts, acc: Any, log: Any) -> dict[str, Any]:
    """FSDP: refuse what it cannot run, shard the adapted model in place, and log what each process holds."""
    cfg, model = parts.cfg, parts.model
    check_method(model, cfg.method_name)
    whole = local_sizes(model)
    units = shard_model(model, acc, FsdpOptions.from_env())
    check_saveable(model, cfg.method_name)
    mine, blocks = local_sizes(model), "/".join(sorted(set(units[:-1])))
    shape = f"{len(units) - 1} x {blocks} + the root" if blocks else "the whole model: no per-layer blocks"
    log(f"FSDP over {acc.num_processes} processes: {len(units)} unit(s) ({shape}); "
        f"this process holds {mine['frozen']:,} of {whole['frozen']:,} frozen parameters "
        f"({mine['frozen_bytes'] / 2**20:.2f} of {whole['frozen_bytes'] / 2**20:.2f} MiB) and "
        f"{mine['trainable']:,} of {whole['trainable']:,} trainable ones")
    return {"units": units, "whole_model": whole}


def _finish(trainer: Any, parts: RunParts, cfg: RunConfig, report: Any, state: Any, test_set: Any, acc: Any,
            resumed: bool, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on test, write adapter + summary into the .partial folder, then rename it to output_dir."""
    test = trainer.evaluate(test_set) if len(test_set) else {}
    summary = {
        "status": "complete", "task": cfg.task, "model": cfg.model.name, "method": cfg.method_name,
        "label_names": parts.label_names,
        "in_features": int(parts.splits.train.features.shape[1]) if hasattr(parts.splits.train, "features") else None,
        "steps": state.step, "epochs": state.step / trainer.steps_per_epoch,
        "examples": {"train": len(trainer.train_set), "valid": len(trainer.valid_set or []), "test": len(test_set)},
        "trainable_params": report.trainable, "total_params": report.total,
        "trainable_percent": report.percent, "valid": state.last_eval, "test": test,
        "train_seconds": state.train_seconds, "samples_per_second": state.samples / max(1e-9, state.train_seconds),
        "wall_seconds_this_process": time.perf_counter() - started, "world_size": acc.num_processes,
        "backend": acc.state.backend if acc.num_processes > 1 else None, "seed": cfg.seed, "resumed": resumed,
        **extra,
    }
    out, run_dir = Path(cfg.output_dir), partial_dir(cfg.output_dir)
    model = trainer.unwrapped if trainer.fsdp else acc.unwrap_model(trainer.model)
    with whole_trainable(model):  # FSDP: every process takes part in gathering the adapter
        if acc.is_main_process:
            trainer.log.write({"step": state.step, "split": "test", **test})
            _save_final(parts, model, run_dir)
            if cfg.task == "causal_lm" and len(parts.splits.test):
                from .samples import SAMPLES, write_samples

                write_samples(model, parts.tokenizer, parts.splits.test, cfg, run_dir / SAMPLES)
    if acc.is_main_process:
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():  # --overwrite: swap in the new run, then drop the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(run_dir, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(run_dir, out)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only after the rename: a crash keeps them
    acc.wait_for_everyone()
    return summary


def _silent(*_: Any) -> None:
    """The log function of non-main processes."""


def train_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = True,
              callbacks: list[TrainerCallback] | None = None, log: Any = print) -> dict[str, Any]:
    """Train `cfg` end to end and return the run summary (also written to <output_dir>/summary.json)."""
    from accelerate.utils import gather_object

    from ..core.report import trainable_report
    from .optim import build_optimizer, build_scheduler
    from .callbacks import method_param_groups
    from .trainer import Trainer, total_steps

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    strategy = resolve_strategy(cfg.distributed.strategy)  # DeepSpeed and unsupported FSDP options fail here
    acc = make_accelerator()
    fsdp = strategy == "fsdp"
    if fsdp:
        require_processes(acc)
    threads = apply_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    if not acc.is_main_process:
        log = _silent
    checkpoint = _check_output(cfg, resume, overwrite)
    with every_process_loads() if fsdp else contextlib.nullcontext():
        parts = build_parts(cfg)
    train_set, valid_set, test_set = parts.encode("train"), parts.encode("valid"), parts.encode("test")
    report = trainable_report(parts.model)
    extra: dict[str, Any] = {"strategy": strategy if acc.num_processes > 1 else None}
    if fsdp:  # before the optimizer: sharding replaces the parameters
        extra["fsdp"] = _shard(parts, acc, log)
    sizes = local_sizes(parts.model)
    extra["parameters_per_process"] = gather_object([sizes]) if acc.num_processes > 1 else [sizes]
    optimizer = build_optimizer(parts.model, cfg.optimizer, method_param_groups(parts.model))
    run_dir = partial_dir(cfg.output_dir)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps(cfg, len(train_set), acc.num_processes))
    trainer = Trainer(parts.model, cfg, train_set, valid_set, optimizer, scheduler, acc, parts.pad_id,
                      len(parts.label_names), callbacks, run_dir, show_progress)
    # ---- validated: from here on files are written ----
    acc.wait_for_everyone()
    if acc.is_main_process and checkpoint is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    acc.wait_for_everyone()
    if checkpoint is not None:
        trainer.resume(checkpoint)
        log(f"resuming from {checkpoint.name} (step {trainer.state.step} of {trainer.max_steps})")
    log(f"{report.summary()}\ntrain/valid/test examples: {len(train_set)}/{len(valid_set)}/{len(test_set)}; "
        f"{trainer.max_steps} steps of {cfg.batch_size} on {acc.num_processes} process(es), "
        f"{threads.threads} torch thread(s) each ({threads.reason})")
    try:
        summary = _finish(trainer, parts, cfg, report, trainer.fit(), test_set, acc, checkpoint is not None, started,
                          extra)
    except BaseException:
        # A run that dies before its first checkpoint cannot be resumed: leave nothing behind.
        # (Later, <output_dir>.partial stays for --resume; <output_dir> itself never appears.)
        if acc.is_main_process and not list_checkpoints(run_dir / "checkpoints"):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    return summary
