"""Model-level merges of full checkpoints (task vectors against a base), streamed one tensor name at a time.

Methods and defaults follow mergekit's: linear (weighted average of whole weights, normalized), task_arithmetic,
ties, dare_linear, dare_ties (base + sum of weighted, sparsified task vectors) and slerp (base to one model).
Per-model values may be mergekit settings: a number, a gradient over layers ([0, 0.5, 1]) or filtered values
([{filter: self_attn, value: ...}, {value: ...}]).
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.errors import ConfigError, MergeError
from ._stream import DTYPES, Checkpoint, StreamWriter, atomic_folder, copy_side_files, merge_config_from_yaml
from .ops import dare_mask, elect_sign

# name -> (sparsification, sign consensus, default normalize, default rescale), as mergekit registers them.
TASK_VECTOR_METHODS = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
}
METHODS = ("linear", *TASK_VECTOR_METHODS, "slerp")
_SHARED = {"linear": {"normalize"}, "slerp": {"t"}}
_TV_SHARED = {"normalize", "rescale", "lambda", "lambda_", "int8_mask", "density", "majority_sign_method"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SLERP_CHUNK = 1024 * 1024  # elements per chunk of slerp's norms and dot, as mergekit reduces them
__all__ = ["METHODS", "merge_checkpoints", "merge_config_from_yaml", "run_merge_yaml", "resolve_setting"]
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# ---- settings: a number, a gradient over layers, or filtered values ----

def resolve_setting(setting: Any, tensor_name: str, position: float, field: str) -> Any:
    """Value of a mergekit-style setting for one tensor (`position` in [0, 1] is its layer's place in the stack)."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float)):
        return setting
    if not isinstance(setting, (list, tuple)):
        raise ConfigError(f"{field}: expected a number, a list of numbers or a list of {{filter, value}}, "
                          f"got {setting!r}")
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float)) for v in setting):
        if any(isinstance(v, bool) for v in setting):
            return setting[int(position * (len(setting) - 1))]
        scaled = position * (len(setting) - 1)  # linear interpolation between the neighbouring entries
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ConfigError(f"{field}: each entry of a filtered list needs 'value' (and optional 'filter'), "
                              f"got {cond!r}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name:
            return resolve_setting(cond["value"], tensor_name, position, field)
    return None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's interpolation point: i / (layers - 1) for a tensor of layer i, 0 for tensors outside the stack."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


# ---- kernels (fp32, or fp64 for fp64 inputs), written to give mergekit's numbers ----

def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: Any, density: float) -> torch.Tensor:
    """Masked delta; rescale "l1" (mergekit) keeps the L1 norm, "density" divides by the keep rate (DARE paper)."""
    kept = delta * mask
    if rescale == "density":
        return kept / density
    if rescale != "l1":
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def sparsify_magnitude(delta: torch.Tensor, density: float, rescale: Any = None) -> torch.Tensor:
    """Keep the max(1, int(density * n)) largest-magnitude entries (TIES' trim, mergekit's selection order)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale, density)


def sparsify_random(delta: torch.Tensor, density: float, rescale: Any, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability density (one Bernoulli draw per entry)."""
    if density >= 1:
        return delta  # no draw, so the random stream matches mergekit's for later tensors
    # bf16 draws stay bf16 (as mergekit's do); fp16 has no CPU Bernoulli kernel, so it goes through fp32.
    work = delta.to(torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32)
    return _rescaled(work, dare_mask(work, density, generator), rescale, density).to(delta.dtype)


def task_vector_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      densities: Sequence[float], method: str, *, normalize: bool, rescale: Any, lambda_: float,
                      majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """base + lambda * merged task vectors for task_arithmetic / ties / dare_linear / dare_ties."""
    kind, consensus, _, _ = TASK_VECTOR_METHODS[method]
    deltas = base.new_empty((len(tensors), *base.shape))
    for i, (tensor, density) in enumerate(zip(tensors, densities)):
        delta = tensor - base
        if kind == "magnitude":
            delta = sparsify_magnitude(delta, density, rescale)
        elif kind == "random":
            delta = sparsify_random(delta, density, rescale, generator)
        deltas[i] = delta
    w = torch.tensor(list(weights), dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if consensus:
        agree = deltas.sign() == elect_sign(deltas, majority_sign_method)  # elected on the weighted deltas
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i * theta_i, divided by sum_i w_i when normalize (mergekit's linear)."""
    w = torch.tensor(list(weights), dtype=tensors[0].dtype)
    result = torch.zeros_like(tensors[0])
    for tensor, coefficient in zip(tensors, w):
        result.addcmul_(tensor, coefficient)  # fused multiply-add: the same rounding as mergekit's
    if normalize:
        result.div_(w.sum())
    return result


def slerp_merge(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of the whole tensor from a (t=0) to b (t=1); near-parallel pairs interpolate linearly."""
    x, y = a.reshape(1, -1), b.reshape(1, -1)
    t = torch.tensor([[t]], dtype=a.dtype)
    if not x.shape[1]:
        return ((1 - t) * x + t * y).reshape(a.shape)
    chunks = range(0, x.shape[1], _SLERP_CHUNK)
    # Norms and dot are reduced over chunks of the flattened tensor, as mergekit does, so sums agree bit-for-bit.
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x[:, s:s + _SLERP_CHUNK], dim=1, keepdim=True)
                                               for s in chunks]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(y[:, s:s + _SLERP_CHUNK], dim=1, keepdim=True)
                                               for s in chunks]), dim=0)
    na, nb = torch.where(na > eps, na, 1), torch.where(nb > eps, nb, 1)
    dot = torch.stack([((x[:, s:s + _SLERP_CHUNK] / na) * (y[:, s:s + _SLERP_CHUNK] / nb)).sum(dim=1, keepdim=True)
                       for s in chunks]).sum(dim=0).clamp(-1, 1)
    straight = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(straight, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(straight, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(straight, t, torch.sin(t * theta) / sin_theta)
    return (ca * x + cb * y).reshape(a.shape)


# ---- planning: every check happens before anything is written ----

def _as_dtype(value: Any, field: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ConfigError(f"{field}: expected one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _num_layers(config: dict, names: list[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 1


def _check_params(method: str, params: dict) -> dict:
    """Shared parameters with mergekit's defaults filled in; unknown names are refused."""
    allowed = _SHARED.get(method, _TV_SHARED)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"parameters: {unknown} not accepted by method {method!r}; "
                          f"expected some of {sorted(allowed)}")
    out = dict(params)
    if method == "linear":
        out.setdefault("normalize", True)
    elif method in TASK_VECTOR_METHODS:
        _, _, normalize, rescale = TASK_VECTOR_METHODS[method]
        out.setdefault("normalize", normalize)
        out.setdefault("rescale", rescale)
        out["lambda"] = out.pop("lambda_", out.get("lambda", 1.0))
        out.setdefault("majority_sign_method", "total")
        if out["majority_sign_method"] not in ("total", "frequency"):
            raise ConfigError(f"majority_sign_method: expected 'total' or 'frequency', "
                              f"got {out['majority_sign_method']!r}")
        r = out["rescale"]
        if r not in (True, False, None, "l1", "density"):
            raise ConfigError(f"rescale: expected true/false, 'l1' or 'density', got {r!r}")
        out["rescale"] = "l1" if r is True else (None if r is False else r)
    elif "t" not in out:
        raise ConfigError("t: method 'slerp' needs the interpolation factor t in [0, 1] (0 gives the base)")
    for flag in ("normalize", "int8_mask"):
        if flag in out and not isinstance(out[flag], bool):
            raise ConfigError(f"{flag}: expected true or false, got {out[flag]!r}")
    return out


def _number(value: Any, field: str, name: str, low: float | None = None, high: float | None = None,
            open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field}: expected a finite number for tensor {name!r}, got {value!r}")
    if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
        lo = "(" if open_low else "["
        raise ConfigError(f"{field}: expected a value in {lo}{low}, {high}] for tensor {name!r}, got {value!r}")
    return float(value)


def _plan(method: str, names: list[str], weights: list, params: dict, num_layers: int, n_sources: int) -> list[dict]:
    """Resolve every setting for every tensor (so a bad density on the last layer fails before any write)."""
    density = params.get("density", 1.0)
    if isinstance(density, (list, tuple)):
        if len(density) != n_sources:
            raise ConfigError(f"density: expected one value or one per source ({n_sources}), "
                              f"got a list of {len(density)}")
        per_source = list(density)
    else:
        per_source = [density] * n_sources
    plan = []
    for name in names:
        pos = layer_position(name, num_layers)
        entry: dict = {}
        if method == "slerp":
            entry["t"] = _number(resolve_setting(params["t"], name, pos, "t"), "t", name, 0.0, 1.0)
        else:
            entry["weights"] = [_number(resolve_setting(w, name, pos, f"weights[{i}]"), f"weights[{i}]", name)
                                for i, w in enumerate(weights)]
        if method in TASK_VECTOR_METHODS:
            entry["density"] = [_number(1.0 if (d := resolve_setting(s, name, pos, f"density[{i}]")) is None else d,
                                        f"density[{i}]", name, 0.0, 1.0, open_low=True)
                                for i, s in enumerate(per_source)]
            entry["lambda"] = _number(resolve_setting(params["lambda"], name, pos, "lambda"), "lambda", name)
        if method == "linear" and params["normalize"] and sum(entry["weights"]) == 0:
            raise ConfigError(f"weights: sum to 0 for tensor {name!r}, cannot normalize (pass normalize=False)")
        plan.append(entry)
    return plan


def _open_all(base, sources, method) -> tuple[Checkpoint | None, list[Checkpoint]]:
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if not sources:
        raise ConfigError("sources: expected at least one checkpoint, got none")
    if method == "slerp" and len(sources) != 1:
        raise ConfigError(f"sources: method 'slerp' interpolates the base with exactly one model, got {len(sources)}")
    if base is None and method != "linear":
        raise ConfigError(f"base: method {method!r} merges task vectors against a base checkpoint; got None")
    base_ckpt = Checkpoint(base, "base") if base is not None else None
    return base_ckpt, [Checkpoint(s, f"sources[{i}]") for i, s in enumerate(sources)]


def _check_compatible(ref: Checkpoint, ref_field: str, others: list[tuple[str, Checkpoint]]) -> None:
    for field, ck in others:
        missing, extra = sorted(set(ref.tensors) - set(ck.tensors)), sorted(set(ck.tensors) - set(ref.tensors))
        if missing or extra:
            raise MergeError(f"{field}: tensor names differ from {ref_field}: missing {missing[:5]}, unexpected "
                             f"{extra[:5]} ({len(missing)} missing, {len(extra)} unexpected)")
        for name, info in ref.tensors.items():
            if ck.tensors[name].shape != info.shape:
                raise MergeError(f"{field}: tensor {name!r} has shape {list(ck.tensors[name].shape)}, "
                                 f"{ref_field} has {list(info.shape)}")


def merge_checkpoints(base: str | Path | None, sources: list[str | Path], weights: list | None, method: str,
                      out: str | Path, *, dtype: Any = None, out_dtype: Any = None, seed: int | None = None,
                      progress: bool | Callable[[int, int, str], None] | None = None, overwrite: bool = False,
                      compute_dtype: str = "float32", **params) -> dict:
    """Merge full checkpoints into a new model folder at `out`; returns a summary (tensors, bytes, seconds).

    params: density (one value or one per source), lambda (or lambda_), normalize, rescale (True/"l1":
    mergekit's L1-preserving DARE rescale, "density": divide by density, False), int8_mask (accepted; no
    numeric effect), majority_sign_method ("total"/"frequency"), t (slerp). dtype casts the inputs, out_dtype
    the written tensors; compute_dtype="input" does task-vector arithmetic in the inputs' dtype like mergekit.
    """
    start = time.perf_counter()
    base_ckpt, srcs = _open_all(base, sources, method)
    bar = None
    try:
        ref, ref_field = (base_ckpt, "base") if base_ckpt is not None else (srcs[0], "sources[0]")
        _check_compatible(ref, ref_field, [(f"sources[{i}]", s) for i, s in enumerate(srcs) if s is not ref])
        params = _check_params(method, params)
        if compute_dtype not in ("float32", "input"):
            raise ConfigError(f"compute_dtype: expected 'float32' (fp64 inputs stay fp64) or 'input', "
                              f"got {compute_dtype!r}")
        params["compute_dtype"] = compute_dtype
        if method == "slerp":
            if weights:
                raise ConfigError(f"weights: method 'slerp' takes t, not weights; got {weights!r}")
        elif weights is None or len(weights) != len(srcs):
            raise ConfigError(f"weights: expected one weight per source ({len(srcs)}), got "
                              f"{'None' if weights is None else len(weights)}")
        in_dtype, out_dt = _as_dtype(dtype, "dtype"), _as_dtype(out_dtype, "out_dtype")
        names = ref.names()
        plan = _plan(method, names, list(weights or []), params, _num_layers(ref.config(), names), len(srcs))
        layout = []
        for name in names:
            info = ref.tensors[name]
            stored = DTYPES[info.dtype]
            layout.append((name, (out_dt or in_dtype or stored) if stored.is_floating_point else stored, info.shape))
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(names), desc=f"merge ({method})", unit="tensor")
        merged = copied = 0
        with atomic_folder(out, overwrite) as tmp:
            writer = StreamWriter(tmp / "model.safetensors", layout, {"merge_method": method})
            try:
                for i, ((name, dt, _), entry) in enumerate(zip(layout, plan)):
                    result = _merge_one(name, method, base_ckpt, srcs, entry, params, in_dtype, generator)
                    if result is None:
                        result, copied = ref.read(name), copied + 1
                    else:
                        merged += 1
                    writer.write(name, result.to(dt))
                    if bar is not None:
                        bar.update(1)
                    elif callable(progress):
                        progress(i + 1, len(names), name)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            copy_side_files(ref.folder, tmp)
            bytes_written = writer.bytes_written
    finally:
        if bar is not None:
            bar.close()
        for ck in ([base_ckpt] if base_ckpt else []) + srcs:
            ck.close()
    return {"method": method, "out": str(out), "sources": len(srcs), "tensors_merged": merged,
            "tensors_copied": copied, "bytes_written": bytes_written, "seconds": time.perf_counter() - start}


def _merge_one(name, method, base_ckpt, srcs, entry, params, in_dtype, generator) -> torch.Tensor | None:
    """Merged value of one tensor name, or None for a non-float tensor (copied from the reference)."""
    raw = [ck.read(name) for ck in srcs]
    if not raw[0].dtype.is_floating_point:
        return None
    base_t = base_ckpt.read(name) if base_ckpt is not None else None

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(in_dtype) if in_dtype is not None else t
        if params["compute_dtype"] == "input" and method in TASK_VECTOR_METHODS:
            return t  # mergekit's task-vector methods do their arithmetic in the loaded dtype
        return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)

    tensors = [prep(t) for t in raw]
    del raw
    if method == "linear":
        result = linear_merge(tensors, entry["weights"], params["normalize"])
    elif method == "slerp":
        result = slerp_merge(prep(base_t), tensors[0], entry["t"])
    else:
        result = task_vector_merge(prep(base_t), tensors, entry["weights"], entry["density"], method,
                                   normalize=params["normalize"], rescale=params["rescale"], lambda_=entry["lambda"],
                                   majority_sign_method=params["majority_sign_method"], generator=generator)
    if not torch.isfinite(result).all():
        raise MergeError(f"tensor {name!r}: the merged values are not finite (method {method!r})")
    return result


def run_merge_yaml(path: str | Path, out: str | Path, **overrides) -> dict:
    """Run the merge a mergekit-style YAML describes into `out` (overrides: seed, progress, overwrite, ...)."""
    return merge_checkpoints(out=out, **{**merge_config_from_yaml(path), **overrides})
