"""Save a base-editing LoRA (PiSSA, OLoRA, MiLoRA, NLoRA, ...) as a plain LoRA of the ORIGINAL base.

After training, the model computes W_res + s B A with W_res = W - s B0 A0 (A0, B0: the init). The
same function of x on the untouched W is the rank-2r LoRA (PEFT's conversion, subtract_mutated_init):
A' = [A; A0], B' = [B, -B0], s' = s, so W + s' B' A' = W_res + s B A. r and every rank_pattern entry
double, alpha (and alpha_pattern) doubles (x sqrt(2) with rsLoRA) to keep s. A0, B0 are recomputed
by running the init again on the original W (kept by core for unload): when that reproduces the
stored residual bit for bit they are the init's own factors; otherwise (randomized inits) they are
the rank-r SVD factors of (W - W_res) / s. Sites whose init left the base alone get zero padding.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...core import layers
from ...core.errors import ConfigError
from ...core.state import WEIGHTS_NAME
from .inits import InitContext, get_init


def _original_weight(site, adapter_name: str) -> torch.Tensor | None:
    """The dense (out, in) weight before `adapter_name`'s edit at `site`, or None when it edited nothing."""
    owners = site.edits.owners()
    if adapter_name not in owners:
        return None
    if len(owners) != 1:
        raise ConfigError(f"save_as_plain_lora: '{site.path}' was edited by adapters {owners}; "
                          f"only a single base-editing adapter per layer can be converted")
    how, saved, _ = site.edits.original["weight"]
    if how != "dense":
        raise ConfigError(f"save_as_plain_lora: '{site.path}' is quantized; the residual cannot be converted exactly")
    return saved.T if layers.is_transposed(site.base_layer) else saved


def _residual(site, adapter_name: str) -> torch.Tensor:
    """The dense (out, in) residual adapter `adapter_name` keeps in the base (held while it is active)."""
    saved = site.edits.values[adapter_name]["weight"][1]
    return saved.T if layers.is_transposed(site.base_layer) else saved


def initial_pair(delta, config, original: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with W_res = W - s B0 A0 for the residual `residual` (see the module docstring)."""
    ctx = InitContext(original, delta.r, tuple(delta.lora_A.weight.shape), tuple(delta.lora_B.weight.shape),
                      delta.path, config, None)
    with torch.random.fork_rng(devices=[]):
        again = get_init(config.init).fn(ctx)
    if again.base_weight is not None and torch.equal(again.base_weight.to(residual.dtype), residual):
        return again.a.to(delta.lora_A.weight.dtype), again.b.to(delta.lora_B.weight.dtype)
    diff = (original.to(torch.float32) - residual.to(torch.float32)) / delta.scaling
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    root = s[:delta.r].sqrt()
    return (root[:, None] * vh[:delta.r]).to(delta.lora_A.weight.dtype), \
        (u[:, :delta.r] * root).to(delta.lora_B.weight.dtype)


def _doubled(config):
    """The plain-LoRA config of rank 2r with the same scaling everywhere."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(init="kaiming", r=2 * config.r, alpha=config.alpha * factor,
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
                          inference_mode=True)


def _pad(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([t, torch.zeros_like(t)], dim=dim)


@torch.no_grad()
def save_as_plain_lora(model, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` as a plain LoRA (PEFT's format, init_lora_weights=True) that
    gives the adapted model's outputs on the ORIGINAL base; the model is not changed."""
    model._check_name(adapter_name)
    config = model.peft_config[adapter_name]
    if type(config).__name__ != "LoraConfig" or config.variant != "lora":
        raise ConfigError(f"save_as_plain_lora: adapter '{adapter_name}' is not a plain LoRA "
                          f"(variant {getattr(config, 'variant', type(config).__name__)!r}); only (A, B) adapters convert")
    if adapter_name in model.merged_adapters:
        raise ConfigError(f"save_as_plain_lora: adapter '{adapter_name}' is merged; unmerge() first")
    tensors = {k: v.detach().to("cpu").clone() for k, v in model.adapter_state_dict(adapter_name).items()}
    for site in model.sites():
        delta = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if delta is None or "lora_A" not in delta._modules and "lora_embedding_A" not in delta._parameters:
            continue
        prefix = f"{type(config).state_prefix}{site.path}."
        original = _original_weight(site, adapter_name)
        if original is None:  # untouched base: the same update at rank 2r
            for key in [k for k in tensors if k.startswith(prefix)]:
                tail = key[len(prefix):]
                if tail.startswith(("lora_A", "lora_embedding_A")):
                    tensors[key] = _pad(tensors[key], 0)
                elif tail.startswith(("lora_B", "lora_embedding_B")):
                    tensors[key] = _pad(tensors[key], 1)
            continue
        a0, b0 = initial_pair(delta, config, original, _residual(site, adapter_name))
        ka, kb = prefix + "lora_A.weight", prefix + "lora_B.weight"
        tensors[ka] = torch.cat([tensors[ka], a0.cpu()], 0).contiguous()
        tensors[kb] = torch.cat([tensors[kb], -b0.cpu()], 1).contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _doubled(config).save(directory)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory
