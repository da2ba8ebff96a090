"""Calibration statistics for data-aware inits, streamed: one pass over the batches, O(in^2) per target.

Core collects them on the frozen base before injection when a config asks (`needs_calibration()`)
and hands each target's `TargetStats` to its delta's `create`. One activation-capture pass serves
every target at once: a forward pre-hook folds each call's input rows (without the padded positions
of the batch's attention_mask) into running sums and keeps nothing else, so memory is one inference
pass plus a few (in, in) float32 matrices per target, whatever the number of batches (batches may be
a generator). For "gradients" each batch is one
forward + backward of the output's `.loss`; only the running gradient sum per target is kept.
What an init does with the sums (an eigendecomposition of the covariance, an SVD of the gradient)
is the method's business.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import layers
from .errors import ConfigError


@dataclass
class TargetStats:
    """Running statistics of what one target saw over the calibration batches.

    Activations ("activations" kind), every input row x of the target (flattened to (rows, in)):
      `xtx` = sum x^T x (float32, (in, in)), `col_sum` = sum x, `rows` = number of rows;
      `scaled_xtx` = sum over calls of X^T X / max(X)^2 with `calls` the number of forward calls
      (the per-call normalised covariance estimator CorDA uses).
    Gradients ("gradients" kind): `gradient` = sum over batches of dL/dW as dense (out, in),
      `batches` = number of batches.
    `cache` holds what an init derives once and other code reuses (e.g. an eigendecomposition).
    `placeholder`: no data at all, because the adapter's tensors come from a file and the base already
      holds any residual (see `calibration_data(BASE_HOLDS_RESIDUAL)`): inits build shapes only.
    """

    xtx: torch.Tensor | None = None
    col_sum: torch.Tensor | None = None
    rows: int = 0
    scaled_xtx: torch.Tensor | None = None
    calls: int = 0
    gradient: torch.Tensor | None = None
    batches: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    placeholder: bool = False

    @torch.no_grad()
    def add_inputs(self, x: torch.Tensor) -> None:
        """Fold one call's input rows (..., in) into the running sums."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.xtx is None:
            n = x.shape[-1]
            self.xtx = x.new_zeros(n, n)
            self.scaled_xtx = x.new_zeros(n, n)
            self.col_sum = x.new_zeros(n)
        self.xtx.addmm_(x.T, x)
        self.col_sum += x.sum(0)
        self.rows += x.shape[0]
        peak = x.max().abs()  # CorDA's normalisation: the call's largest value
        if peak > 0:
            xs = x / peak
            self.scaled_xtx.addmm_(xs.T, xs)
        self.calls += 1

    def add_gradient(self, g: torch.Tensor) -> None:
        """Add one batch's dense (out, in) weight gradient."""
        self.gradient = g if self.gradient is None else self.gradient + g
        self.batches += 1

    def gram(self) -> torch.Tensor:
        """X^T X over every input row (in, in), in float32."""
        if self.xtx is None:
            raise ConfigError("calibration: no activations were recorded for this target")
        return self.xtx

    def covariance(self) -> torch.Tensor:
        """Sample covariance of the input rows (in, in), mean removed, in float64."""
        if self.rows < 2:
            raise ConfigError(f"calibration: {self.rows} input row(s) seen; a covariance needs at least 2")
        mean = self.col_sum.double() / self.rows
        return (self.gram().double() - self.rows * torch.outer(mean, mean)) / (self.rows - 1)

    def scaled_covariance(self) -> torch.Tensor:
        """Mean over calls of X^T X / max(X)^2 (in, in), float32 (CorDA's covariance estimate)."""
        if not self.calls:
            raise ConfigError("calibration: no activations were recorded for this target")
        return self.scaled_xtx / self.calls

    def mean_gradient(self) -> torch.Tensor:
        """dL/dW averaged over the batches, dense (out, in)."""
        if self.gradient is None:
            raise ConfigError("calibration: no gradient was recorded for this target")
        return self.gradient / self.batches


# ---- data for adapters added without `calibration=` (e.g. by AdaptedModel.from_pretrained) ----------
BASE_HOLDS_RESIDUAL = "base_holds_residual"
# What core/state.py passes as `calibration` when loading a saved adapter: the scoped data if any; else an
# init whose data only shaped the saved tensors (config.loads_without_calibration()) builds shapes only.
LOADING = "loading"
_SCOPED: ContextVar = ContextVar("unipeft_calibration", default=None)


@contextmanager
def calibration_data(batches) -> Iterator[None]:
    """Calibration for adapters added inside the block without `calibration=`, e.g. when loading a saved
    data-aware adapter: the batches it was created with rebuild the same init and base residual, or
    BASE_HOLDS_RESIDUAL when the base already is the residual (a PEFT-saved CorDA / LoRA-GA model):
    then the init only builds its tensors (the file fills them) and edits nothing."""
    token = _SCOPED.set(batches)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def scoped_calibration():
    """The batches (or BASE_HOLDS_RESIDUAL) of the innermost `calibration_data` block, or None."""
    return _SCOPED.get()


def _call(model: nn.Module, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _usage(owner: str, kind: str) -> str:
    labels = ", with labels so the output has a loss" if kind == "gradients" else ""
    return (f"pass calibration=[batch, ...] to up.adapt / add_adapter (model inputs as dicts{labels}), "
            f"or set `calibration: {{batches: N}}` in the `unipeft train` run config")


def collect(model: nn.Module, targets: list[tuple[str, nn.Module]], batches: Iterable, kind: str,
            owner: str = "config") -> dict[str, TargetStats]:
    """Stream `batches` through the frozen `model` once and return each target's running statistics
    (kind "activations": input sums; kind "gradients": the gradient of the output's `.loss` with
    respect to each target weight). The model's modes and requires_grad flags are restored."""
    if batches is None:
        raise ConfigError(f"{owner}: this init needs calibration data: {_usage(owner, kind)}")
    stats = {path: TargetStats() for path, _ in targets}
    rows_kept = [None]  # the current batch's attention_mask as booleans (token-shaped inputs drop padding)
    modules = dict(targets)
    handles = []
    if kind == "activations":
        for path, module in targets:
            def record(mod, args, path=path):
                x, mask = args[0], rows_kept[0]
                if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask]  # padding positions are batching artifacts, not data
                stats[path].add_inputs(x)
            handles.append(module.register_forward_pre_hook(record))
    weights = {}
    if kind == "gradients":
        for path, module in targets:
            if layers.is_quantized(module):
                raise ConfigError(f"{owner}: gradient-based inits need an unquantized weight at '{path}'")
            weights[path] = module.weight
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        wanted = {id(w) for w in weights.values()}
        for p in flags if weights else ():  # gradients only for the target weights: no graph for the rest
            p.requires_grad_(id(p) in wanted)
        for batch in batches:
            seen += 1
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            rows_kept[0] = mask.bool() if torch.is_tensor(mask) else None
            if kind == "gradients":
                loss = getattr(_call(model, batch), "loss", None)
                if loss is None:
                    raise ConfigError(f"{owner}: a calibration batch gave no loss; include labels in each "
                                      f"batch (e.g. {{'input_ids': ..., 'labels': ...}})")
                grads = torch.autograd.grad(loss, list(weights.values()))
                for path, g in zip(weights, grads):
                    stats[path].add_gradient(layers.to_param_layout(modules[path], g.detach()))
                del loss, grads
            else:
                with torch.no_grad():
                    _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if not seen:
        raise ConfigError(f"{owner}: the calibration data is empty: {_usage(owner, kind)}")
    return stats
