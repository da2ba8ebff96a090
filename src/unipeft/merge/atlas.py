"""aTLAS: merge adapters with learned per-block coefficients ("Knowledge composition using task vectors
with learned anisotropic scaling", Zhang et al.).

Each source adapter's tensors are its task vector. For every parameter block (one parameter of the
adapter's delta at one site, or of its shared bank) and every source k there is one scalar
lambda[block, k]; the merged block is sum_k lambda[block, k] * tau_k[block]. The lambdas, and only they,
are trained by gradient descent (Adam) on a few labelled batches with the base and the sources fixed.
The method-specific code is never touched: during training the new adapter's parameters are swapped
for the lambda-weighted sums with `torch.func.functional_call` over the whole model, so every method's
own forward runs on them and gradients flow back to the lambdas alone. At the end the sums are written
into the new adapter as plain parameters, so it saves and loads like any adapter.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.calibration import LOADING
from ..core.errors import MergeError
from .adapters import check_same, check_sources, fixed_state, parts

# Fields that do not change what the tensors mean: sources may differ in them.


@dataclass
class _Block:
    """One parameter block of the new adapter and the matching tensor of every source."""

    key: str                 # "<site path>.<parameter name>", or "bank.<parameter name>"
    full_name: str           # the new adapter's parameter name in model.named_parameters()
    target: nn.Parameter     # the new adapter's parameter (written once, at the end)
    taus: list[torch.Tensor]  # one detached copy per source, in the order of `sources`


def _check_sources(model, sources: Sequence[str]) -> None:
    """The checks of parameter-space merges: distinct adapters of one method and config, equal layouts
    and equal fixed state (aTLAS combines parameters only)."""
    check_sources(model, sources)
    check_same(model, sources)


def _check_arguments(model, batches: list, steps: int, lr: float, loss_fn) -> None:
    if model.merged_adapters:
        raise MergeError(f"atlas_merge: adapters {model.merged_adapters} are merged into the base weights; "
                         f"unmerge() first so the coefficients are learned against the base")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise MergeError(f"atlas_merge: steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MergeError(f"atlas_merge: lr must be a finite number > 0, got {lr!r}")
    if steps > 0 and not batches:
        raise MergeError(f"atlas_merge: batches must hold at least one labelled batch to train {steps} steps, "
                         f"got none")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise MergeError(f"atlas_merge: batches[{i}] must be a dict of model inputs, got {type(b).__name__}")
        if loss_fn is None and "labels" not in b:
            raise MergeError(f"atlas_merge: batches[{i}] has no 'labels' (keys {sorted(b)}); the default loss is "
                             f"the cross-entropy of the logits against batch['labels'], or pass loss_fn")


def _initial(init: float | Sequence[float] | None, k: int) -> list[float]:
    """The starting lambdas per source: 1/K each by default (the plain average)."""
    if init is None:
        return [1.0 / k] * k
    values = [init] * k if isinstance(init, (int, float)) else list(init)
    if len(values) != k or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise MergeError(f"atlas_merge: init must be one finite number or {k} of them (one per source), "
                         f"got {init!r}")
    return [float(v) for v in values]


def _free_name(model, base: str = "atlas") -> str:
    name, i = base, 1
    while name in model.peft_config:
        name, i = f"{base}_{i}", i + 1
    return name


def _blocks(model, name: str, sources: Sequence[str]) -> list[_Block]:
    """Every parameter of the new adapter, paired with the same parameter of each source."""
    full = {id(p): n for n, p in model.named_parameters()}
    per_source = [parts(model, s) for s in sources]
    out, seen = [], set()
    for where, mod in parts(model, name).items():
        src_params = [dict(m[where].named_parameters()) for m in per_source]
        for pname, param in mod.named_parameters():
            if id(param) in seen:  # a parameter shared by several modules of the adapter is one block
                continue
            seen.add(id(param))
            taus = [sp[pname].detach().clone() for sp in src_params]
            out.append(_Block(f"{where}.{pname}", full[id(param)], param, taus))
    return out


def _combine(lam: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """sum_k lam[k] * taus[k], accumulated in source order (so a fixed lam gives a reproducible sum)."""
    out = lam[0].to(taus[0].device, taus[0].dtype) * taus[0]
    for k in range(1, len(taus)):
        out = out + lam[k].to(taus[k].device, taus[k].dtype) * taus[k]
    return out


def default_loss(outputs, batch: Mapping) -> torch.Tensor:
    """Cross-entropy of `outputs.logits` against `batch["labels"]` (any leading shape; -100 is ignored)."""
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                           ignore_index=-100)


@contextlib.contextmanager
def _training_view(model, name: str):
    """Only adapter `name` active, nothing of the model trainable, eval mode; everything restored after."""
    ctx = model._ctx  # the active composition block, if any, is restored as it was
    previous = ctx.composition if ctx.composition is not None else model.active_adapters
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.set_adapter(name)
        for p in model.parameters():
            p.requires_grad_(False)  # gradients reach the lambdas only, whatever the user had unfrozen
        model.eval()  # no dropout: the coefficients are few and dropout's noise only slows their fit
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags.values():
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _train(model, name: str, blocks: list[_Block], coefs: torch.Tensor, batches: list, steps: int,
           lr: float, loss_fn: Callable, seed: int) -> None:
    """Adam on the lambdas over the batches in a seeded order (a new permutation per pass)."""
    if steps == 0:
        return
    opt = torch.optim.Adam([coefs], lr=lr)
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    with _training_view(model, name), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # randomness inside the forward is seeded too; the caller's RNG is kept
        for _ in range(steps):
            if not queue:
                queue = torch.randperm(len(batches), generator=order).tolist()
            batch = batches[queue.pop(0)]
            params = {b.full_name: _combine(coefs[i], b.taus) for i, b in enumerate(blocks)}
            outputs = functional_call(model, params, args=(), kwargs=dict(batch), strict=False)
            loss = loss_fn(outputs, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def atlas_merge(model, sources: list[str], batches, *, name: str | None = None, steps: int = 50,
                lr: float = 1e-2, init: float | Sequence[float] | None = None,
                loss_fn: Callable | None = None, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """Merge `sources` into a new adapter with learned per-block coefficients; (its name, {block: K lambdas}).

    `sources`: adapters of `model` of one method and config. `batches`: dicts of model inputs with
    "labels"; each step runs `model(**batch)` (labels included, so `loss_fn=lambda out, batch: out.loss`
    uses the model's own loss, e.g. a causal LM's shifted one) and `loss_fn(outputs, batch)` (default:
    `default_loss`). `init`: the lambda of each source at the start, one number or K; default 1/K (the
    plain average). aTLAS starts full task vectors at 0; for factored adapters 0 is a stationary point
    (LoRA's B @ A has no gradient in either factor's lambda when both are 0). Blocks are keyed
    "<site path>.<parameter name>" ("bank.<name>" for an adapter's shared module). `name` defaults to
    "atlas" ("atlas_1", ... when taken); the new adapter is not activated. `seed` fixes the batch order
    and any randomness of the forward. On any error nothing of the model changes (no adapter is left
    behind).
    """
    if batches is None or isinstance(batches, (str, Mapping)):
        raise MergeError(f"atlas_merge: batches must be a list of dicts of model inputs, got "
                         f"{type(batches).__name__}")
    batches = list(batches)
    _check_sources(model, sources)
    _check_arguments(model, batches, steps, lr, loss_fn)
    start = _initial(init, len(sources))
    if name is None:
        name = _free_name(model)
    elif name in model.peft_config:
        raise MergeError(f"atlas_merge: an adapter named '{name}' already exists; pick another name")
    # Built as a saved adapter is loaded: every tensor is overwritten below, so a data-aware init only
    # needs to shape them (and rebuilds a base residual from data scoped by core.calibration_data).
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the caller's RNG as it was
        torch.manual_seed(seed)
        model.add_adapter(name, model.peft_config[sources[0]].replace(), calibration=LOADING)
    try:
        for where, mod in parts(model, name).items():  # fixed state comes from the sources (all equal)
            src = fixed_state(parts(model, sources[0])[where])
            with torch.no_grad():
                for key, value in src.items():
                    mod.get_buffer(key).copy_(value)
        blocks = _blocks(model, name, sources)
        if not blocks:
            raise MergeError(f"atlas_merge: adapters of {type(model.peft_config[name]).method} here hold no "
                             f"parameters, so there is nothing to weight")
        coefs = torch.tensor([start] * len(blocks), dtype=torch.float32).reshape(len(blocks), len(sources))
        coefs.requires_grad_(True)
        _train(model, name, blocks, coefs, batches, steps, lr, loss_fn or default_loss, seed)
        with torch.no_grad():
            for i, b in enumerate(blocks):
                b.target.copy_(_combine(coefs[i].detach(), b.taus))
    except BaseException:
        model.delete_adapter(name)
        raise
    return name, {b.key: coefs[i].detach().clone() for i, b in enumerate(blocks)}
