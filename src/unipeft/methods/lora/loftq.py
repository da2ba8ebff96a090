"""LoftQ (Li et al., 2023): a quantized base Q plus a rank-r LoRA fitted to what quantization lost.

Alternating for t = 1..T (T = loftq_config["loftq_iter"]):
  Q_t = quant(W - B_{t-1} A_{t-1}),  (L, R) = rank-r SVD of W - dequant(Q_t)  (L = U sqrt(S), R = sqrt(S) V^T).
`init="loftq"` on a full-precision base returns base_weight = dequant(Q_T): NF4 with blocksize 64 and
no nested absmax (loftq_bits=4) or row-wise int8 (loftq_bits=8), built by the same bitsandbytes
calls core/layers.py uses, so quantizing that base again with those settings is exact. PEFT sets
B = L, A = R whatever the scaling s; here B = L / sqrt(s), A = R / sqrt(s), so s B A = L R for any
alpha (identical to PEFT when alpha = r).

On a base that is already quantized the original weights are gone: `replace_lora_weights_loftq`
reads them from a safetensors file (lazily, one tensor per layer) and fits B, A to
W - dequant(Q) with the layer's stored Q (one step, as PEFT's function of that name).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ...core import layers
from ...core.errors import ConfigError
from .inits import InitContext, InitResult, register_init

BLOCKSIZE = 64  # bitsandbytes' default 4-bit blocksize (also what a later Linear4bit uses by default)


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """dequant(quant(weight)) in float32: NF4 (blocksize 64, plain absmax) or row-wise int8."""
    import bitsandbytes as bnb

    w = weight.detach().to("cpu", torch.float32).contiguous()
    if bits == 4:
        q = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=BLOCKSIZE,
                              compress_statistics=False).to("cpu")  # quantizes
        return layers._dequantize(q).to(weight.device)
    if bits == 8:
        q = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
        return layers._dequantize(q, q.SCB).to(weight.device)
    raise ConfigError(f"LoftQ: loftq_bits must be 4 or 8, got {bits!r}")


def low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L @ R the best rank-r approximation of `residual` (L = U sqrt(S), R = sqrt(S) V^T)."""
    u, s, vh = torch.linalg.svd(residual.to(torch.float32), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def loftq(weight: torch.Tensor, bits: int, r: int, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequant(Q_T), L, R) of LoftQ's alternating fit on a dense (out, in) weight."""
    if iters < 1:
        raise ConfigError(f"LoftQ: loftq_iter must be >= 1, got {iters!r}")
    w = weight.detach().to(torch.float32)
    target = w
    for t in range(iters):
        deq = quantize_dequantize(target, bits)
        left, right = low_rank(w - deq, r)
        if t + 1 < iters:
            target = w - left @ right
    return deq, left, right


def _split(left: torch.Tensor, right: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with scaling * B @ A == left @ right."""
    root = math.sqrt(scaling)
    return left / root, right / root


def _loftq_init(ctx: InitContext) -> InitResult:
    if len(ctx.a_shape) != 2:
        raise ConfigError(f"LoraConfig.init='loftq': '{ctx.path}' is not a matrix layer (LoftQ fits Linear weights)")
    cfg = {"loftq_bits": 4, "loftq_iter": 1, **ctx.config.loftq_config}
    bits = cfg["loftq_bits"]
    w = ctx.weight.to(torch.float32)
    if torch.equal(quantize_dequantize(w, bits), w):
        # Already on the LoftQ grid (a base quantized with these settings): W - dequant(Q) is 0, nothing to fit.
        raise ConfigError(f"LoraConfig.init='loftq': the weight of '{ctx.path}' is already {bits}-bit quantized, "
                          f"so its original values are gone; adapt with the default init and call "
                          f"up.replace_lora_weights_loftq(model, weights=<original safetensors>)")
    deq, left, right = loftq(w, bits, ctx.r, cfg["loftq_iter"])
    b, a = _split(left, right, ctx.config.scaling(ctx.path))
    return InitResult(a, b, base_weight=deq.to(ctx.weight.dtype))


register_init("loftq", _loftq_init)


# ---- quantized bases: original weights from a file ------------------------------------------------
class _Weights:
    """Tensors by name from a state dict, a .safetensors file, or a folder holding (sharded) safetensors."""

    def __init__(self, weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        self.tensors = weights if isinstance(weights, Mapping) else None
        self.files: dict[str, str] = {}
        if self.tensors is not None:
            return
        path = os.fspath(weights)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    self.files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
                return
            path = os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"replace_lora_weights_loftq: no safetensors file at {path}")
        self.default = path

    def get(self, names: list[str]) -> torch.Tensor:
        """The first of `names` present, read on its own (safe_open: lazily)."""
        if self.tensors is not None:
            for n in names:
                if n in self.tensors:
                    return self.tensors[n]
            raise ConfigError(f"replace_lora_weights_loftq: none of {names} is in the given state dict")
        from safetensors import safe_open

        for n in names:
            path = self.files.get(n, None if self.files else self.default)
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as f:
                if n in f.keys():
                    return f.get_tensor(n)
        where = sorted(set(self.files.values()))[0] if self.files else self.default
        raise ConfigError(f"replace_lora_weights_loftq: none of {names} is in {where}")


@torch.no_grad()
def replace_lora_weights_loftq(model, weights: str | os.PathLike | Mapping[str, torch.Tensor],
                               adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Set adapter `adapter_name`'s A, B at every LoRA site on a quantized linear to the rank-r fit of
    W - dequant(Q) (W read from `weights`: a safetensors file/folder or a state dict; Q: the layer's
    stored weight, unchanged). `callback(model, path)` returning False rolls that site back (as in
    PEFT). Returns the paths replaced."""
    from .deltas import LoraLinear

    model._check_name(adapter_name)
    source = _Weights(weights)
    prefix = getattr(model.base_model, "base_model_prefix", "") or ""
    sites = [s for s in model.sites() if adapter_name in s.deltas and isinstance(s.deltas[adapter_name], LoraLinear)
             and layers.is_packed(s.base_layer)]
    if not sites:
        raise ConfigError(f"replace_lora_weights_loftq: adapter '{adapter_name}' has no LoRA on a quantized linear")
    done = []
    for site in sites:
        delta = site.deltas[adapter_name]
        if adapter_name in site.merged:
            raise ConfigError(f"replace_lora_weights_loftq: adapter '{adapter_name}' is merged at '{site.path}'")
        key = site.path + ".weight"
        names = [key] + ([key.removeprefix(prefix + ".")] if prefix and key.startswith(prefix + ".") else [])
        w = source.get(names).to(torch.float32)
        deq = layers.dense_weight(site.base_layer)
        if w.shape != deq.shape:
            raise ConfigError(f"replace_lora_weights_loftq: '{names[0]}' has shape {tuple(w.shape)}, the layer "
                              f"'{site.path}' {tuple(deq.shape)}")
        left, right = low_rank(w - deq, delta.r)
        b, a = _split(left, right, delta.scaling)
        old = delta.lora_A.weight.detach().clone(), delta.lora_B.weight.detach().clone()
        delta.lora_A.weight.copy_(a)
        delta.lora_B.weight.copy_(b)
        if callback is not None and not callback(model, site.path):
            delta.lora_A.weight.copy_(old[0])
            delta.lora_B.weight.copy_(old[1])
            continue
        done.append(site.path)
    return done
