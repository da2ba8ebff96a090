"""Hot-swapping LoRA adapters in a compiled model without recompiling it.

torch.compile specialises its graph on tensor shapes and on Python numbers, so loading an
adapter of another rank or alpha into a compiled model recompiles it. The remedy (the facts are
PEFT's, peft/utils/hotswap.py; the code is ours):

- `prepare_hotswap(model, max_rank)`, before compiling: every A of the adapter gets zero rows and
  every B zero columns up to `max_rank` (the output is unchanged: the added rank components are
  0) and each site's scaling becomes a 0-d tensor buffer (non-persistent: files keep PEFT's keys).
  The adapter's stored config is restated as rank `max_rank` with the alpha that keeps each site's
  scaling, so `save_pretrained` still writes a file that loads back to the same outputs.
- `hotswap_adapter(model, directory)`: another saved LoRA adapter (same target modules, rank <=
  max_rank, any alpha or rsLoRA) is copied into those very tensors in place (zero padded), with
  its scalings; the compiled graph runs on with the new adapter. Everything is checked before
  anything is written: on error the model is unchanged.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ...core.delta import Delta
from ...core.errors import AdapterLoadError, ConfigError
from ...core.model import AdaptedModel
from ...core.state import read_adapter
from . import fused
from .config import LoraConfig
from .deltas import LoraConv, LoraDelta, LoraEmbedding, LoraLinear

# Per LoRA layer class: own state key -> the dimension that holds the rank.
RANK_DIMS: dict[type, dict[str, int]] = {
    LoraLinear: {"lora_A.weight": 0, "lora_B.weight": 1},
    LoraConv: {"lora_A.weight": 0, "lora_B.weight": 1},
    LoraEmbedding: {"lora_embedding_A": 0, "lora_embedding_B": 1},
}


def _adapted(model, what: str) -> AdaptedModel:
    """The AdaptedModel behind `model` (torch.compile's wrapper holds it as `_orig_mod`)."""
    inner = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model
    if not isinstance(inner, AdaptedModel):
        raise ConfigError(f"{what}: expected an AdaptedModel (up.adapt(...)) or torch.compile of one, "
                          f"got {type(model).__name__}")
    return inner


def _lora_config(model: AdaptedModel, adapter_name: str, what: str) -> LoraConfig:
    model._check_name(adapter_name)
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"{what}: adapter '{adapter_name}' is {type(config).__name__} "
                          f"(peft_type {config.peft_type}); only LoRA adapters can be hot-swapped")
    _check_plain(config, f"{what}: adapter '{adapter_name}'")
    return config


def _check_plain(config: LoraConfig, who: str) -> None:
    if config.variant != "lora":
        raise ConfigError(f"{who} uses the '{config.variant}' variant (use_dora={config.use_dora}); only plain "
                          f"LoRA can be hot-swapped (DoRA's magnitude depends on the base weights)")


def _sites(model: AdaptedModel, adapter_name: str) -> list[tuple[str, Delta]]:
    return [(s.path, s.deltas[adapter_name]) for s in model.sites() if adapter_name in s.deltas]


def _rank_dims(delta: Delta) -> dict[str, int]:
    """Own state key -> rank dimension for a LoRA delta; {} for the adapter's other deltas (modules_to_save)."""
    for cls, dims in RANK_DIMS.items():
        if isinstance(delta, cls):
            return dims
    return {}


def _restated(config: LoraConfig, scalings: dict[str, float], rank: int, loaded: LoraConfig) -> LoraConfig:
    """`config` stated for rank `rank` at every site, each site's alpha chosen to keep its scaling;
    what the model resolved or was told at load time (fan_in_fan_out, inference_mode) stays `loaded`'s."""
    per = math.sqrt(rank) if config.use_rslora else rank
    alphas = {path: s * per for path, s in scalings.items()}
    common = Counter(alphas.values()).most_common(1)[0][0]
    return config.frozen_copy(r=rank, rank_pattern={}, alpha=common, inference_mode=loaded.inference_mode,
                              fan_in_fan_out=loaded.fan_in_fan_out,
                              alpha_pattern={p: a for p, a in alphas.items() if a != common})


def prepare_hotswap(model, max_rank: int | None = None, adapter_name: str = "default") -> None:
    """Before torch.compile: zero-pad the LoRA ranks to `max_rank` (default: the largest), scalings as tensors."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ConfigError("prepare_hotswap: call it on the model before torch.compile (padding changes the "
                          "shapes the compiled graph was built for)")
    model = _adapted(model, "prepare_hotswap")
    config = _lora_config(model, adapter_name, "prepare_hotswap")
    loras = [(p, d) for p, d in _sites(model, adapter_name) if isinstance(d, LoraDelta)]
    if max_rank is None:
        max_rank = max(d.r for _, d in loras)
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank <= 0:
        raise ConfigError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    too_big = [f"'{p}' has rank {d.r}" for p, d in loras if d.r > max_rank]
    if too_big:
        raise ConfigError(f"prepare_hotswap: max_rank={max_rank} is below the rank of adapter '{adapter_name}' at "
                          f"{len(too_big)} sites ({'; '.join(too_big[:3])}); pass the largest rank you will swap in")
    scalings = {}
    with torch.no_grad():
        for path, delta in loras:
            for key, dim in _rank_dims(delta).items():
                _pad(delta, key, dim, max_rank)
            scaling = delta.scaling
            scalings[path] = float(scaling)
            if not isinstance(scaling, torch.Tensor):
                del delta.scaling  # a plain float attribute until now
                device = next(delta.parameters()).device
                delta.register_buffer("scaling", torch.tensor(scaling, device=device), persistent=False)
            delta.r = max_rank
            if isinstance(delta, LoraLinear):  # the fused path's view of the delta records its rank
                object.__setattr__(delta, "_alone", [fused.Member(delta)] if delta.fuses else [])
    model.peft_config[adapter_name] = _restated(config, scalings, max_rank, config)
    model._ctx.version += 1  # sites re-resolve, the fused path re-learns its groups


def _tensor(delta: Delta, key: str) -> torch.Tensor:
    params = dict(delta.named_parameters())
    return params[key] if key in params else delta.get_buffer(key)


def _pad(delta: Delta, key: str, dim: int, rank: int) -> None:
    """Grow the tensor at `key` to `rank` along `dim` with zeros (the same Parameter object)."""
    param = delta.get_parameter(key)
    if param.shape[dim] == rank:
        return
    shape = list(param.shape)
    shape[dim] = rank
    padded = param.new_zeros(shape)
    padded.narrow(dim, 0, param.shape[dim]).copy_(param)
    param.data = padded
    owner = delta.get_submodule(key.rpartition(".")[0]) if "." in key else None
    if owner is not None:  # keep the nn.Linear / nn.Conv of A or B describing its new size
        for attr in (("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")):
            if attr in owner.__dict__:
                setattr(owner, attr, rank)


def hotswap_adapter(model, directory: str | Path, adapter_name: str = "default") -> None:
    """Replace adapter `adapter_name`'s weights and scalings in place with the LoRA adapter saved in `directory`."""
    config, tensors = read_adapter(directory)
    hotswap_adapter_from_state(model, config, tensors, adapter_name, source=str(directory))


def hotswap_adapter_from_state(model, config, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                               source: str = "the new adapter") -> None:
    """`hotswap_adapter` from a config and {file key: tensor} (as `adapter_state_dict` gives them)."""
    model = _adapted(model, "hotswap_adapter")
    current = _lora_config(model, adapter_name, "hotswap_adapter")
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"hotswap_adapter: {source} is {type(config).__name__} (peft_type {config.peft_type}); "
                          f"only a LoRA adapter can be swapped into LoRA adapter '{adapter_name}'")
    _check_plain(config, f"hotswap_adapter: {source}")
    if config.dropout != current.dropout:
        raise ConfigError(f"hotswap_adapter: {source} has dropout={config.dropout} but adapter '{adapter_name}' has "
                          f"dropout={current.dropout}; the dropout is part of the compiled graph, so it must match")
    sites = _sites(model, adapter_name)
    unprepared = [p for p, d in sites if isinstance(d, LoraDelta) and not isinstance(d.scaling, torch.Tensor)]
    if unprepared:
        raise ConfigError(f"hotswap_adapter: adapter '{adapter_name}' was not prepared (e.g. '{unprepared[0]}' holds "
                          f"its scaling as a number); call up.prepare_hotswap(model, max_rank=...) before compiling")
    merged = [s.path for s in model.sites() if adapter_name in s.merged]
    if merged:
        raise ConfigError(f"hotswap_adapter: adapter '{adapter_name}' is merged (e.g. at '{merged[0]}'); "
                          f"unmerge() first")
    writes, scalings = _plan(model, adapter_name, sites, config, tensors, source)
    with torch.no_grad():
        for target, dim, tensor in writes:
            value = tensor.to(device=target.device, dtype=target.dtype)
            if dim is None or target.shape[dim] == value.shape[dim]:
                target.copy_(value)
            else:
                target.zero_()
                target.narrow(dim, 0, value.shape[dim]).copy_(value)
        for delta, scaling in scalings.values():
            delta.scaling.fill_(scaling)
    rank = max((d.r for d, _ in scalings.values()), default=config.r)
    model.peft_config[adapter_name] = _restated(config, {p: s for p, (_, s) in scalings.items()}, rank, current)


def _plan(model: AdaptedModel, adapter_name: str, sites, config: LoraConfig, tensors: dict, source: str):
    """([(target tensor, rank dim or None, new value)], {path: (delta, new scaling)}), or raise listing every misfit."""
    prefix = type(model.peft_config[adapter_name]).state_prefix
    expected = {}
    for path, delta in sites:
        dims = _rank_dims(delta)
        own = {delta.saved_key(k): k for k in delta.state_dict()}
        for suffix in delta.export_state():
            key = own[suffix]
            expected[f"{prefix}{path}.{suffix}"] = (path, delta, key, dims.get(key))
    problems: dict[str, list[str]] = {}
    extra = sorted({k[len(prefix):].split(".lora_")[0] for k in tensors if k not in expected})
    missing = sorted({path for k, (path, *_) in expected.items() if k not in tensors})
    if extra:
        problems["targets"] = [f"{source} targets modules adapter '{adapter_name}' does not: {extra[:5]}"]
    if missing:
        problems.setdefault("targets", []).append(f"{source} lacks modules adapter '{adapter_name}' targets: "
                                                  f"{missing[:5]}")
    writes, scalings = [], {}
    for file_key, (path, delta, key, dim) in expected.items():
        if file_key not in tensors:
            continue
        target, new = _tensor(delta, key), tensors[file_key]
        same = [i for i in range(target.dim()) if i != dim]
        if new.dim() != target.dim() or any(new.shape[i] != target.shape[i] for i in same):
            problems.setdefault(path, []).append(f"'{key}' has shape {tuple(new.shape)}, expected {tuple(target.shape)}"
                                                 + ("" if dim is None else f" with any rank <= {target.shape[dim]} "
                                                    f"in dimension {dim}"))
            continue
        if dim is not None:
            n = new.shape[dim]
            want, _ = config.rank_and_alpha(path)
            if n > target.shape[dim]:
                problems.setdefault(path, []).append(f"'{key}' has rank {n} but the model was prepared for "
                                                     f"max_rank={target.shape[dim]}; prepare_hotswap with a "
                                                     f"larger max_rank")
                continue
            if n != want:
                problems.setdefault(path, []).append(f"'{key}' has rank {n} but {source}'s config gives rank {want}")
                continue
            scalings[path] = (delta, config.scaling(path))
        writes.append((target, dim, new))
    if problems:
        lines = [f"  {where}: {'; '.join(msgs)}" for where, msgs in sorted(problems.items())[:20]]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AdapterLoadError(f"hotswap_adapter: {source} cannot replace adapter '{adapter_name}' (nothing was "
                               f"changed):\n" + "\n".join(lines) + more)
    return writes, scalings
