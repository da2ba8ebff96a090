"""The training loop, on `accelerate`: the same code runs in one process or under accelerate launch/torchrun.

Exactness across process counts: every optimizer step takes one *global* batch (a pure
function of seed and epoch), cut into world_size x grad_accum contiguous micro-batches.
Each process backpropagates its summed loss x world_size / (total weight of the global
batch); DDP averages gradients over processes (FSDP reduce-scatters their mean), so every run
computes the gradient of the global mean loss whatever its process count and strategy.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import AdaptedModel
from ..data.batching import epoch_batches, micro_batches
from ..data.encode import EncodedSet, collate
from ..data.splits import DataError
from .callbacks import CallbackList, TrainContext, TrainerCallback, method_callbacks
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, loss_terms, model_inputs
from .fsdp import clip_grad_norm_, is_fsdp, no_grad_sync
from .progress import MetricsLog, Progress
from .galore import GaLoreMixin, check_layerwise
from .zo import ZerothOrderOptimizer


def total_steps(cfg: Any, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: max_steps, else epochs x full batches per epoch (DataError if none fit)."""
    parts = world_size * cfg.grad_accum
    if n_train < cfg.batch_size:
        raise DataError(f"the training split has {n_train} examples, fewer than batch_size={cfg.batch_size}; "
                        f"lower batch_size or add data")
    if cfg.batch_size < parts:
        raise DataError(f"batch_size={cfg.batch_size} is smaller than processes x grad_accum = {parts}")
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * (n_train // cfg.batch_size)))


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (transformers models); ConfigError for other models."""
    from ..core.errors import ConfigError

    # transformers >= 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    for name, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                      ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, name, None)
        if callable(enable):
            # non-reentrant: works with a frozen base whose inputs need no grad (adapter training)
            enable(**{key: {"use_reentrant": False}})
            return
    raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it "
                      f"(transformers models do); set gradient_checkpointing: false")


@dataclass
class LoopState:
    """Where the loop is: saved in checkpoints and restored by --resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs the optimizer steps of one RunConfig on encoded data, with eval, logging and checkpoints."""

    def __init__(self, model: nn.Module, cfg: Any, train_set: EncodedSet, valid_set: EncodedSet | None,
                 optimizer: torch.optim.Optimizer, scheduler: Any, accelerator: Any, pad_id: int = 0,
                 num_labels: int = 0, callbacks: list[TrainerCallback] | None = None,
                 run_dir: Path | None = None, show_progress: bool = True) -> None:
        self.cfg, self.train_set, self.valid_set = cfg, train_set, valid_set
        self.acc, self.pad_id, self.num_labels = accelerator, pad_id, num_labels
        self.unwrapped = model
        # A model sharded by fsdp.shard_model is used as it is (accelerate would wrap it in DDP).
        self.fsdp = is_fsdp(model)
        self.model, self.optimizer = (model, optimizer) if self.fsdp else accelerator.prepare(model, optimizer)
        self.scheduler = scheduler  # not prepared: accelerate would step it once per process
        # A forward-only optimizer (train/zo.py) is stepped by itself, not through accelerate's wrapper.
        self.zo = optimizer if isinstance(optimizer, ZerothOrderOptimizer) else None
        # Per-layer GaLore steps each weight in its gradient hook (train/galore.py): nothing to clip or accumulate.
        self.layerwise = optimizer if isinstance(optimizer, GaLoreMixin) and optimizer.steps_in_backward else None
        if self.layerwise is not None:
            check_layerwise(cfg, accelerator.num_processes, self.fsdp)
        self.callbacks = CallbackList(method_callbacks(model) + list(callbacks or []))
        self.run_dir = run_dir
        main = accelerator.is_main_process
        self.log = MetricsLog(run_dir / "metrics.jsonl" if run_dir is not None and main else None)
        self.show_progress = show_progress and main
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.max_steps = total_steps(cfg, len(train_set), accelerator.num_processes)
        self.state = LoopState()
        self.ctx = TrainContext(model, self.optimizer, max_steps=self.max_steps, rank=accelerator.process_index,
                                world_size=accelerator.num_processes)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)

    # ---- one optimizer step ---------------------------------------------------------------
    def _step(self, batch: list[int]) -> tuple[float, float | None]:
        """Forward/backward every micro-batch of one global batch, then step; return (mean loss, grad norm).
        A forward-only (zeroth-order) optimizer takes `_forward_only_step` instead: no backward, no norm."""
        if self.zo is not None:
            return self._forward_only_step(batch), None
        acc, data = self.acc, self.train_set
        total_weight = float(sum(data.weights[i] for i in batch))
        scale = acc.num_processes / total_weight
        local = torch.zeros((), device=acc.device)
        chunks = micro_batches(batch, acc.process_index, acc.num_processes, self.cfg.grad_accum)
        self.model.train()
        for k, idx in enumerate(chunks):
            tensors = {n: t.to(acc.device) for n, t in collate([data.rows[i] for i in idx], self.pad_id).items()}
            sync = k == len(chunks) - 1
            with contextlib.nullcontext() if sync else self._no_sync():
                logits = self.model(**model_inputs(tensors)).logits
                loss_sum = loss_terms(self.cfg.task, logits, tensors["labels"]).sum()
                acc.backward(loss_sum * scale)
            local += loss_sum.detach()
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            params = [p for p in self.unwrapped.parameters() if p.requires_grad]
            clip = clip_grad_norm_ if self.fsdp else acc.clip_grad_norm_
            grad_norm = float(clip(params, self.cfg.max_grad_norm))
        self.callbacks.on_before_optimizer_step(self.ctx)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(acc.reduce(local, reduction="sum")) / total_weight
        return loss, grad_norm

    def _forward_only_step(self, batch: list[int]) -> float:
        """A zeroth-order step: the optimizer evaluates the global batch's mean loss at the points it chooses
        (no autograd graph, no .grad); return the mean of those losses."""
        acc, data = self.acc, self.train_set
        total_weight = float(sum(data.weights[i] for i in batch))
        chunks = micro_batches(batch, acc.process_index, acc.num_processes, self.cfg.grad_accum)
        inputs = [{n: t.to(acc.device) for n, t in collate([data.rows[i] for i in idx], self.pad_id).items()}
                  for idx in chunks]  # collated once: every step runs at least two passes over them

        def closure() -> torch.Tensor:
            # the same weighting as backpropagation: summed per-example losses / total weight, over all processes
            local = torch.zeros((), device=acc.device)
            for tensors in inputs:
                logits = self.model(**model_inputs(tensors)).logits
                local += loss_terms(self.cfg.task, logits, tensors["labels"]).sum()
            return acc.reduce(local, reduction="sum") / total_weight

        self.callbacks.on_before_optimizer_step(self.ctx)
        self.model.eval()  # both losses of an estimate must differ only by the perturbation (no dropout)
        with torch.no_grad():
            loss = self.zo.step(closure)
        self.model.train()
        self.scheduler.step()
        return float(loss)

    def _warm_up(self) -> None:
        """Fill the adapted model's call caches (AdaptedModel.warm_up) from two training rows, so the
        first step computes like every later one, and a resumed run like the uninterrupted one."""
        model, rows = self.unwrapped, self.train_set.rows
        if not isinstance(model, AdaptedModel) or not rows:
            return
        tensors = collate([rows[i] for i in range(min(2, len(rows)))], self.pad_id)
        model.warm_up(**model_inputs({n: t.to(self.acc.device) for n, t in tensors.items()}))

    def _no_sync(self) -> Any:
        """Context of a micro-batch whose gradients are accumulated without communication."""
        return no_grad_sync(self.model) if self.fsdp else self.acc.no_sync(self.model)

    # ---- evaluation / checkpoints -----------------------------------------------------------
    def evaluate(self, data: EncodedSet) -> dict[str, float]:
        """Metrics on `data`, computed across all processes (FSDP: in lockstep, as forwards gather weights)."""
        return evaluate(self.model, data, self.cfg.task, self.cfg.eval_batch_size, self.pad_id, self.num_labels,
                        self.acc, lockstep=self.fsdp)

    def _eval_valid(self, progress: Progress) -> None:
        if self.valid_set is None or len(self.valid_set) == 0:
            return
        metrics = self.evaluate(self.valid_set)
        self.state.last_eval = metrics
        self.ctx.metrics.update({f"valid_{k}": v for k, v in metrics.items()})
        self.log.write({"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch, "split": "valid",
                        **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
        progress.write(f"step {self.state.step}: valid {shown}")
        self.callbacks.on_evaluate(self.ctx, metrics)

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.unwrapped, self.optimizer,
                        self.scheduler, vars(self.state), self.callbacks.state_dict(), self.acc,
                        self.cfg.keep_checkpoints)

    def resume(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: tensors, optimizer, schedule, RNG and loop position."""
        state, cb_states = load_checkpoint(checkpoint, self.unwrapped, self.optimizer, self.scheduler, self.acc)
        self.state = LoopState(**{k: v for k, v in state.items() if k in LoopState.__dataclass_fields__})
        self.callbacks.load_state_dict(cb_states)
        self.log.truncate_after(self.state.step)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> LoopState:
        """Train until max_steps; evaluate, log and checkpoint at the configured intervals."""
        cfg, st, ctx = self.cfg, self.state, self.ctx
        ctx.step, ctx.epoch = st.step, st.epoch
        self._warm_up()
        self.callbacks.on_train_begin(ctx)
        progress = Progress(self.max_steps, st.step, self.show_progress)
        window_loss = window_w = 0.0
        window_samples, window_start = 0, time.perf_counter()
        try:
            while st.step < self.max_steps and not ctx.should_stop:
                batches = epoch_batches(self.train_set.lengths, cfg.batch_size, cfg.seed, st.epoch,
                                        cfg.data.group_by_length)
                while st.batch_in_epoch < len(batches) and st.step < self.max_steps and not ctx.should_stop:
                    t0 = time.perf_counter()
                    self.callbacks.on_step_begin(ctx)
                    batch = batches[st.batch_in_epoch]
                    loss, grad_norm = self._step(batch)
                    st.step += 1
                    st.batch_in_epoch += 1
                    st.samples += len(batch)
                    st.train_seconds += time.perf_counter() - t0
                    ctx.step = st.step
                    window_loss += loss * len(batch)
                    window_w += len(batch)
                    window_samples += len(batch)
                    rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                    progress.update(1, loss=loss, samples_s=rate)
                    self.callbacks.on_step_end(ctx)
                    if st.step % cfg.log_every == 0 or st.step == self.max_steps:
                        record = {"step": st.step, "epoch": st.step / self.steps_per_epoch,
                                  "loss": window_loss / window_w, "lr": self.scheduler.get_last_lr()[0],
                                  "samples_per_s": rate}
                        if grad_norm is not None:
                            record["grad_norm"] = grad_norm
                        ctx.metrics.update({"loss": record["loss"], "lr": record["lr"]})
                        self.log.write(record)
                        window_loss = window_w = 0.0
                        window_samples, window_start = 0, time.perf_counter()
                    epoch_done = st.batch_in_epoch >= len(batches)
                    if epoch_done:
                        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                        ctx.epoch = st.epoch
                    if (cfg.eval_every is not None and st.step % cfg.eval_every == 0) or \
                            (cfg.eval_every is None and epoch_done) or st.step == self.max_steps or ctx.should_stop:
                        self._eval_valid(progress)
                    if cfg.save_every is not None and st.step % cfg.save_every == 0 and st.step < self.max_steps:
                        self._checkpoint()
                    if epoch_done:
                        break
        finally:
            progress.close()
            if self.layerwise is not None:  # a later backward (evaluation code, the user's) must not step weights
                self.layerwise.remove_hooks()
        self.callbacks.on_train_end(ctx)
        return st
