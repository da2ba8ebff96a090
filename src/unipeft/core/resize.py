"""Resizable deltas: change a parameter's size along one dimension during training, optimizer included.

Rank allocation (AdaLoRA's pruning, IncreLoRA's growth, SoRA's dropped ranks) changes the shape of
a delta's factors while an optimizer holds state for them. Two tools, method-agnostic:

- `resize_param(module, name, dim, keep, new_size, optimizer)` replaces the parameter by a new
  Parameter object whose entries `keep` along `dim` sit at positions 0..len(keep)-1 and whose
  new positions take `fill` (zeros by default), and puts it where the old one was in the
  optimizer's param_groups and state (a Parameter whose shape changed under autograd's cached
  gradient accumulators is not safe, so identity changes, everywhere at once). Every optimizer
  state tensor of the parameter's shape (AdamW's exp_avg, exp_avg_sq, ...) is resized the same
  way in the state dict, kept entries for kept rows and zeros for new ones; scalar state
  (AdamW's step) is kept.
- `rebuild_adapter(model, adapter_name, config, optimizer)` builds an adapter's deltas afresh
  from `config` (e.g. a checkpoint's recorded rank_pattern), swaps them in with
  `AdaptedModel.replace_deltas`, and puts the new Parameter objects in the optimizer's
  param_groups where the old ones were, so `optimizer.load_state_dict` maps saved state onto
  them by position. Their values are then expected to be loaded (checkpoint resume).

Not supported: parameters sharded by FSDP or bucketed by DDP (their flat buffers have fixed sizes).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError


def _take(t: torch.Tensor, dim: int, keep: torch.Tensor, new_size: int,
          fill: torch.Tensor | None = None) -> torch.Tensor:
    """`t` with entries `keep` along `dim` first, then `fill` (zeros) up to `new_size`."""
    kept = t.index_select(dim, keep.to(t.device))
    extra = new_size - kept.shape[dim]
    if extra == 0:
        return kept.contiguous()
    shape = list(t.shape)
    shape[dim] = extra
    pad = torch.zeros(shape, dtype=t.dtype, device=t.device) if fill is None else fill.to(t.device, t.dtype)
    if tuple(pad.shape) != tuple(shape):
        raise ConfigError(f"resize: new entries must have shape {tuple(shape)}, got {tuple(pad.shape)}")
    return torch.cat([kept, pad], dim).contiguous()


def optimizer_state(optimizer: Any, param: nn.Parameter) -> dict[str, Any] | None:
    """The optimizer's state dict entry for `param` (None without an optimizer or state yet)."""
    if optimizer is None:
        return None
    return optimizer.state.get(param)


def swap_param(optimizer: Any, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put `new` where `old` is in the optimizer's param_groups, moving (not copying) its state."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = state


def resize_param(module: nn.Module, name: str, dim: int, keep: torch.Tensor | list[int], new_size: int,
                 optimizer: Any = None, fill: torch.Tensor | None = None) -> nn.Parameter:
    """Resize `module.<name>` along `dim`: rows `keep` survive (in that order), new rows are `fill` (zeros).

    A new Parameter (same requires_grad) replaces the old one on the module and in the optimizer's
    param_groups; the optimizer's per-element state (AdamW's exp_avg / exp_avg_sq) is resized in
    place in its state dict (kept rows kept, zeros for new rows), scalar state (step) kept. The
    gradient is dropped. Returns the new Parameter."""
    param = getattr(module, name)
    keep = torch.as_tensor(keep, dtype=torch.long).view(-1)
    size = param.shape[dim]
    if keep.numel() > new_size or (keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= size)):
        raise ConfigError(f"resize: keep={keep.tolist()} does not fit a dimension of size {size} "
                          f"resized to {new_size}")
    old_shape = tuple(param.shape)
    with torch.no_grad():
        new = nn.Parameter(_take(param.detach(), dim, keep, new_size, fill), requires_grad=param.requires_grad)
    setattr(module, name, new)
    swap_param(optimizer, param, new)
    state = optimizer_state(optimizer, new)
    if state:
        for key, value in list(state.items()):
            if torch.is_tensor(value) and tuple(value.shape) == old_shape:
                state[key] = _take(value, dim, keep, new_size)
    return new


def rebuild_adapter(model, adapter_name: str, config: AdapterConfig, optimizer: Any = None) -> None:
    """Rebuild adapter `adapter_name`'s deltas from `config` (same sites) and swap the optimizer's
    parameters to the new ones by name; ConfigError (model unchanged) if a parameter name differs."""
    from .registry import method_for_config

    spec = method_for_config(config)
    # Only the method's own deltas (not e.g. modules_to_save copies of the same adapter) are rebuilt.
    sites = {s.path: s for s in model.sites()
             if adapter_name in s.deltas and isinstance(s.deltas[adapter_name], spec.delta_cls)}
    frozen = config.frozen_copy()
    bank = model.banks[adapter_name] if adapter_name in model.banks else None
    new = {path: spec.delta_cls.create(site.base_layer, frozen, path, bank) for path, site in sites.items()}
    swap: dict[int, nn.Parameter] = {}
    for path, delta in new.items():
        old = dict(sites[path].deltas[adapter_name].named_parameters())
        fresh = dict(delta.named_parameters())
        if set(old) != set(fresh):
            raise ConfigError(f"rebuild of adapter '{adapter_name}' at '{path}': parameters {sorted(fresh)} do "
                              f"not match the current {sorted(old)}")
        for name, p in old.items():
            fresh[name].data = fresh[name].data.to(p.device, p.dtype)
            swap[id(p)] = (p, fresh[name])
    model.replace_deltas(adapter_name, new, config)
    for p, fresh_p in swap.values():  # the saved optimizer state is loaded onto them next
        swap_param(optimizer, p, fresh_p)
        if optimizer is not None:
            optimizer.state.pop(fresh_p, None)
