"""FPF: fine-tune only the forgetting-prone modules on the replay buffer.

Two ways to train "only those modules", both through core's adapter abstraction:

- a plain model (e.g. a CNN trained from scratch): a temporary adapter is injected on the
  selected modules with `up.adapt`, trained on the buffer and merged back with
  `merge_and_unload()`. `mode="full"` trains full copies of the modules (core's
  `modules_to_save` delta); `mode="lora"` puts LoRA on the selected Linear/Conv layers (other
  selected modules, e.g. BatchNorm, get full copies). Every other parameter and buffer is
  left bit-identical: the base is frozen and unselected modules run in eval mode.
- an AdaptedModel (a frozen pretrained model with a PEFT adapter): only the adapter's
  parameters at the selected sites train; the others are frozen for the duration.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import AdaptedModel, adapt
from ..core.registry import get_method
from ..methods.lora import LoraConfig
from .buffer import ReservoirBuffer
from .drift import SCORES
from .errors import ContinualError
from .stream import TaskStream

FPF_MODES = ("full", "lora")
FPF_LOSSES = ("ce", "kd")
_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class FPFConfig:
    """How FPF fine-tunes the selected modules on the buffer."""

    steps: int = 100
    lr: float = 0.05
    batch_size: int = 32
    budget: float = 0.1          # fraction of the tracked parameters FPF may train
    score: str = "mean_abs"      # drift score ranking the modules: "mean_abs" or "relative"
    top: int | None = None       # at most this many modules
    include: tuple[str, ...] = ()  # modules always selected
    mode: str = "full"           # plain models: "full" copies or "lora" on the selected modules
    lora_r: int = 4
    loss: str = "auto"           # "ce", "kd" (CE + alpha * MSE to stored logits), auto: kd if logits stored
    kd_alpha: float = 0.3
    optimizer: str = "sgd"

    def validate(self) -> None:
        """Check the fields; ContinualError names the bad one."""
        if self.mode not in FPF_MODES:
            raise ContinualError(f"FPFConfig.mode: unknown {self.mode!r}; valid: {', '.join(FPF_MODES)}")
        if self.loss not in (*FPF_LOSSES, "auto"):
            raise ContinualError(f"FPFConfig.loss: unknown {self.loss!r}; valid: ce, kd, auto")
        if not 0 < self.budget <= 1:
            raise ContinualError(f"FPFConfig.budget: expected a fraction of the parameters in (0, 1], "
                                 f"got {self.budget!r}")
        if self.score not in SCORES:
            raise ContinualError(f"FPFConfig.score: unknown {self.score!r}; valid: {', '.join(SCORES)}")
        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ContinualError(f"FPFConfig: steps >= 0, batch_size > 0 and lr > 0 required; got steps="
                                 f"{self.steps}, batch_size={self.batch_size}, lr={self.lr}")


def make_optimizer(params: Sequence[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (stateless, as in Mammoth) or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ContinualError(f"optimizer {name!r} unknown; valid: sgd, adam")


def _exact(paths: Sequence[str]) -> str:
    """A regex matching exactly these module paths (core treats a string spec as a fullmatch regex)."""
    return "|".join(re.escape(p) for p in paths)


def _adapter_for(model: nn.Module, modules: Sequence[str], cfg: FPFConfig):
    """The core adapter config that makes exactly `modules` trainable."""
    full_cls = get_method("modules_to_save").config_cls
    if cfg.mode == "full":
        return full_cls(target_modules=_exact(modules))
    lora = [m for m in modules if isinstance(model.get_submodule(m), _LORA_TYPES)]
    rest = [m for m in modules if m not in lora]
    if not lora:
        return full_cls(target_modules=_exact(rest))
    return LoraConfig(r=cfg.lora_r, alpha=cfg.lora_r, target_modules=_exact(lora), modules_to_save=rest or None)


def _loss_fn(cfg: FPFConfig, buffer: ReservoirBuffer, stream: TaskStream) -> Callable:
    kind = cfg.loss if cfg.loss != "auto" else ("kd" if buffer.has_logits else "ce")
    if kind == "kd" and not buffer.has_logits:
        raise ContinualError("FPF loss 'kd' needs logits stored in the buffer (DER++ or k-FPF-KD)")

    def loss(logits: torch.Tensor, batch) -> torch.Tensor:
        out = F.cross_entropy(stream.mask_logits(logits, batch.task_ids), batch.labels)
        if kind == "kd":
            out = out + cfg.kd_alpha * F.mse_loss(logits, batch.logits)
        return out

    return loss


def _train(model: nn.Module, params: list[nn.Parameter], buffer: ReservoirBuffer, stream: TaskStream,
           cfg: FPFConfig, generator: torch.Generator, on_step: Callable | None) -> None:
    opt = make_optimizer(params, cfg.optimizer, cfg.lr)
    loss_fn = _loss_fn(cfg, buffer, stream)
    for _ in range(cfg.steps):
        batch = buffer.sample(cfg.batch_size, generator)

        def step(batch=batch) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*batch.inputs), batch).backward()
            opt.step()

        if on_step is None:
            step()
        else:
            on_step(len(batch), step)


def _set_modes(root: nn.Module, train: Sequence[nn.Module]) -> None:
    """Everything in eval mode except `train` (so unselected BatchNorms keep their statistics)."""
    root.eval()
    for m in train:
        m.train()


def fpf_finetune(model: nn.Module, buffer: ReservoirBuffer, modules: Sequence[str], stream: TaskStream,
                 cfg: FPFConfig | None = None, generator: torch.Generator | None = None,
                 on_step: Callable[[int, Callable[[], None]], None] | None = None) -> nn.Module:
    """Fine-tune only `modules` of `model` on `buffer` for `cfg.steps` steps; returns the model (same object).

    `on_step(n_examples, step_fn)` lets a caller wrap each optimizer step (compute metering).
    """
    cfg = cfg or FPFConfig()
    cfg.validate()
    if not modules:
        raise ContinualError("fpf_finetune: no module selected")
    if len(buffer) == 0:
        raise ContinualError("fpf_finetune: the replay buffer is empty")
    gen = generator or torch.Generator().manual_seed(0)
    was_training = model.training
    if isinstance(model, AdaptedModel):
        _finetune_sites(model, buffer, modules, stream, cfg, gen, on_step)
    else:
        _finetune_plain(model, buffer, modules, stream, cfg, gen, on_step)
    model.train(was_training)
    return model


def _finetune_plain(model: nn.Module, buffer, modules, stream, cfg, gen, on_step) -> None:
    names = dict(model.named_modules())
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise ContinualError(f"fpf_finetune: no module {unknown} in {type(model).__name__}; "
                             f"modules: {[n for n in names if n][:20]}")
    adapted = adapt(model, _adapter_for(model, modules, cfg), adapter_name="fpf")
    try:
        sites = {s.path: s for s in adapted.sites()}
        if sorted(sites) != sorted(modules):  # suffix matching could catch a same-named module elsewhere
            raise ContinualError(f"fpf_finetune: the adapter landed on {sorted(sites)}, expected {sorted(modules)}")
        _set_modes(model, list(sites.values()))
        params = [p for p in adapted.parameters() if p.requires_grad]
        _train(adapted, params, buffer, stream, cfg, gen, on_step)
    except BaseException:
        adapted.unload()
        raise
    adapted.merge_and_unload()


def _finetune_sites(model: AdaptedModel, buffer, modules, stream, cfg, gen, on_step) -> None:
    sites = {s.path: s for s in model.sites()}
    unknown = [m for m in modules if m not in sites]
    if unknown:
        raise ContinualError(f"fpf_finetune: {unknown} carry no adapter; adapted modules: {sorted(sites)}")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = set(modules)
    chosen = {id(p) for n in model.active_adapters for d in model.deltas(n) if d.path in wanted
              for p in d.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) in chosen]
    try:
        for p in model.parameters():
            p.requires_grad_(p.requires_grad and id(p) in chosen)
        _set_modes(model, [sites[m] for m in modules])
        _train(model, params, buffer, stream, cfg, gen, on_step)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
