"""Merging adapters into the base weights for AdaptedModel: checks, the requantization report, rollback,
and merge_and_unload's dequantized float export.

A merge into a bitsandbytes 4/8-bit layer stores Q(W + dW), not W + dW; each such write is reported
as a `RequantizationError`. Every check runs before the first write, and a write that still fails
undoes this call's merges (packed weights bit for bit), so a refused merge leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import layers
from .errors import MergeError
from .registry import method_for_config


@dataclass(frozen=True)
class RequantizationError:
    """How far the stored (requantized) merged weight is from the exact sum W + dW at one site."""

    path: str
    param: str
    adapter: str
    max_abs: float  # max |stored - (W + dW)|
    rel_fro: float  # ||stored - (W + dW)||_F / ||W + dW||_F


def _expected_shape(module: nn.Module, key: str) -> tuple[int, ...]:
    if layers.is_packed(module, key):
        geo = layers.geometry(module)
        return (geo.out_features, geo.in_features)
    return tuple(dict(module.named_parameters())[key].shape)


def check_merge(model, sites: list, names: list[str]) -> None:
    """MergeError naming the method and the layer for any (site, adapter) that cannot be merged."""
    for site in sites:
        base = site.base_layer
        params = dict(base.named_parameters())
        for n in site.merge_order(names):
            if n in site.merged:
                continue
            spec = method_for_config(model.peft_config[n])
            where = f"adapter '{n}' ({spec.name}) into '{site.path}' ({type(base).__name__})"
            if layers.is_quantized(base) and not spec.capabilities.quantized_base:
                raise MergeError(f"cannot merge {where}: {spec.name} does not support quantized base layers")
            with torch.no_grad():
                try:
                    dw = site.deltas[n].delta_weight()
                except MergeError as exc:
                    raise MergeError(f"cannot merge {where}: {exc}") from None
            for key, value in dw.items():
                if key not in params:
                    raise MergeError(f"cannot merge {where}: it changes '{key}', which the layer does not have")
                if tuple(value.shape) != _expected_shape(base, key):
                    raise MergeError(f"cannot merge {where}: its '{key}' delta has shape {tuple(value.shape)}, "
                                     f"the layer's {key} {_expected_shape(base, key)}")


def refuse_tied(model, sites: list, names: list[str]) -> None:
    """Merging into a weight shared with another module (tied embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for path, p in model.base_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(path)
    for site in sites:
        params = dict(site.base_layer.named_parameters())
        for n in names:
            if n not in site.deltas or n in site.merged:
                continue
            for key in site.deltas[n].delta_weight():
                shared = owners.get(id(params.get(key)), [])
                if len(shared) > 1:
                    raise MergeError(f"cannot merge adapter '{n}' into '{site.path}.{key}': that weight is "
                                     f"tied to {sorted(shared)}, so merging would change all of them; "
                                     f"keep this adapter unmerged or do not target tied modules")


def merge(model, adapter_names: list[str] | None, safe_merge: bool) -> list[RequantizationError]:
    """AdaptedModel.merge: check everything, then merge site by site; on a failed write undo this call."""
    if model._ctx.composition is not None:
        raise MergeError(f"the active {type(model._ctx.composition).__name__} block composes adapters per "
                         f"site, rows or tokens, which one merged weight cannot hold; set_adapter(names) first")
    names = model.active_adapters if adapter_names is None else list(adapter_names)
    for n in names:
        model._check_name(n)
        spec = method_for_config(model.peft_config[n])
        if not spec.capabilities.mergeable:
            raise MergeError(f"adapter '{n}' uses {spec.name}, which cannot be merged into the weights")
    sites = list(model.sites())
    refuse_tied(model, sites, names)
    check_merge(model, sites, names)
    if safe_merge:
        for site in sites:
            for n in names:
                site.check_finite_merge(n)
    report: list[RequantizationError] = []
    started: list[tuple] = []  # (site, number merged there before this call)
    try:
        for site in sites:
            started.append((site, len(site.merged)))
            for n in site.merge_order(names):
                try:
                    errors = site.merge(n)
                except Exception as exc:
                    spec = method_for_config(model.peft_config[n])
                    raise MergeError(f"cannot merge adapter '{n}' ({spec.name}) into '{site.path}' "
                                     f"({type(site.base_layer).__name__}): {exc}; no merge of this call was "
                                     f"kept") from exc
                report += [RequantizationError(site.path, k, n, *e) for k, e in errors.items()]
    except Exception:
        for site, keep in reversed(started):
            site.unmerge(keep)
        raise
    object.__setattr__(model, "last_merge_report", report)
    return report


def dense_copy(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding the quantized layer's dequantized weight (and its bias) in `dtype`."""
    geo = layers.geometry(module)
    weight = layers.dense_weight(module)
    out = nn.Linear(geo.in_features, geo.out_features, bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            out.bias.copy_(module.bias.to(dtype))
    out.requires_grad_(False)
    out.train(module.training)
    return out


def merge_dequantized(model, adapter_names: list[str] | None, safe_merge: bool, dtype: torch.dtype) -> None:
    """Merge into float copies of the quantized layers: every quantized site's base becomes an nn.Linear
    holding dequant(W) in `dtype`, the merge adds dW in `dtype` (no requantization), and the other
    quantized linears of the model are dequantized too. On a refused merge the original layers are put back."""
    swapped = []
    for site in model.sites():
        if layers.is_quantized(site.base_layer):
            old = site.base_layer
            swapped.append((site, old))
            _rebind(site, old, dense_copy(old, dtype))
    try:
        merge(model, adapter_names, safe_merge)
    except Exception:
        for site, old in swapped:
            _rebind(site, site.base_layer, old)
        raise
    wrapped = {id(s.base_layer) for s in model.sites()}
    for path, module in list(model.base_model.named_modules()):
        if layers.is_quantized(module) and id(module) not in wrapped:
            parent, _, child = path.rpartition(".")
            setattr(model.base_model.get_submodule(parent) if parent else model.base_model, child,
                    dense_copy(module, dtype))


def _rebind(site, old: nn.Module, new: nn.Module) -> None:
    """Make `new` the site's base layer and the base of every delta that pointed at `old`."""
    site.base_layer = new
    for delta in site.deltas.values():
        if delta.base is old:
            object.__setattr__(delta, "_base", new)
    site._seen_version = -1
