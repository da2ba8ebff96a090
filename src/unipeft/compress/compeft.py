"""ComPEFT: compress a saved adapter of any method to a sparse ternary task vector, bit-packed.

Per tensor x of the adapter file (key K), with reference r (below) and task vector t = x - r:
  1. keep the k = max(1, round(density * numel)) entries of largest |t| (ties: torch.topk's choice),
     minus those where t is exactly 0 (a zero has no sign);
  2. store their positions (1 bit per entry), their signs (1 bit per kept entry) and one float32 scale s;
  3. the reconstruction is x_hat = r + s * sign(t) * mask, computed in float32 and cast to x's dtype.
The scale rule is an explicit option: "mean_abs" (default) sets s = mean |t| over the kept entries, the
scale that minimises ||x_hat - x|| for the kept signs, so it needs no tuning; "std" is ComPEFT's rule,
s = alpha * std(t) over all entries (population std), alpha to be tuned on validation data. Even at
density 1 the result is lossy: every kept entry becomes +-s.

The reference. A task vector is measured from the tensor's deterministic init, which the file alone
cannot tell. With `base_model` given, the method's own Delta answers with no per-method code: a fresh
adapter with the same config is built on the base twice under two different seeds. A tensor equal in
both builds has a deterministic init: if all its entries are one constant c (LoRA B: 0, IA3 vectors: 1)
then r = c (stored in the header); otherwise (a copy of base weights, a seeded frozen projection) the
tensor is stored raw, exactly, since the reader has no base to rebuild r from. A tensor that differs
between the builds starts random (LoRA A), so r = 0 and the value itself is compressed. Without
`base_model` every float tensor has r = 0 (right for LoRA; for methods starting at non-zero constants,
such as IA3, pass the base). Integer tensors (sparse indices) are always stored raw.

The file format is described in packing.py. Writing goes to a temporary folder next to the target,
moved into place only when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.calibration import LOADING
from ..core.config import CONFIG_NAME, AdapterConfig
from ..core.errors import AdapterLoadError, ConfigError
from ..core.model import AdaptedModel
from ..core.registry import method_for_config
from ..core.state import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter
from . import packing
from .packing import COMPRESSED_NAME, FORMAT_NAME, FORMAT_VERSION

SCALE_RULES = ("mean_abs", "std")
_SEEDS = (0, 1)  # two different draws: a tensor equal in both has a deterministic init


def _check_options(density, scale: str, alpha) -> float:
    """The density as a float, after checking every option (ConfigError naming the argument)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"compress_adapter: density must be a number in (0, 1], got {density!r}")
    if scale not in SCALE_RULES:
        raise ConfigError(f"compress_adapter: scale must be one of {list(SCALE_RULES)}, got {scale!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"compress_adapter: alpha must be a positive finite number, got {alpha!r}")
    return float(density)


def _read_source(src_dir: Path) -> tuple[AdapterConfig, str, dict[str, torch.Tensor], int]:
    """Config, its file text, tensors and the weights file's size of a saved adapter folder."""
    if not (src_dir / CONFIG_NAME).is_file():
        raise AdapterLoadError(f"src_dir={str(src_dir)!r} is not an adapter folder (no {CONFIG_NAME})")
    try:
        config, tensors = read_adapter(src_dir)
    except FileNotFoundError as exc:
        raise AdapterLoadError(f"src_dir={str(src_dir)!r} is not an adapter folder: {exc}") from None
    weights = src_dir / WEIGHTS_NAME
    size = (weights if weights.is_file() else src_dir / LEGACY_WEIGHTS_NAME).stat().st_size
    return config, (src_dir / CONFIG_NAME).read_text(), tensors, size


def _fresh_state(base_model: nn.Module, config: AdapterConfig, seed: int) -> dict[str, torch.Tensor]:
    """The state of a freshly initialised adapter with `config` on `base_model` (left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(base_model, AdaptedModel):
            name = next(f"compeft_reference_{i}" for i in range(len(base_model.peft_config) + 1)
                        if f"compeft_reference_{i}" not in base_model.peft_config)
            base_model.add_adapter(name, config, calibration=LOADING)
            try:
                return {k: v.detach().clone() for k, v in base_model.adapter_state_dict(name).items()}
            finally:
                base_model.delete_adapter(name)
        model = AdaptedModel(base_model, config, "default", calibration=LOADING)
        try:
            return {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}
        finally:
            model.unload()


def references(base_model: nn.Module | None, config: AdapterConfig,
               tensors: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """{key: constant reference, or None when the init is deterministic but not constant (stored raw)}."""
    if base_model is None:
        return {k: 0.0 for k in tensors}
    config = config.replace(inference_mode=True)
    first, second = (_fresh_state(base_model, config, s) for s in _SEEDS)
    lost = sorted(set(tensors) - set(first))
    if lost:
        raise AdapterLoadError(f"base_model: a fresh adapter with this config has no key {lost[0]!r} "
                               f"({len(lost)} keys of the file missing); is it the adapter's base model?")
    out: dict[str, float | None] = {}
    for key in tensors:
        a, b = first[key], second[key]
        if not torch.equal(a, b):
            out[key] = 0.0  # random init: the value itself is the task vector
            continue
        flat = a.reshape(-1)
        out[key] = float(flat[0].float()) if flat.numel() and bool((flat == flat[0]).all()) else None
    return out


def _is_ternary(value: torch.Tensor, reference: float | None) -> bool:
    return (reference is not None and value.numel() > 0 and value.dtype.is_floating_point
            and packing.dtype_name(value.dtype) in packing.SUPPORTED_DTYPES)


def compress_tensor(value: torch.Tensor, reference: float, density: float, scale: str = "mean_abs",
                    alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kept mask, positive flags, float32 scale) of one tensor's task vector `value - reference`."""
    t = (value.float() - torch.tensor(reference, dtype=torch.float32)).reshape(-1)
    n = t.numel()
    k = max(1, min(n, round(density * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(t.abs(), k, sorted=False).indices] = True
    mask &= t != 0
    if scale == "mean_abs":
        s = t[mask].abs().mean() if bool(mask.any()) else torch.zeros(())
    else:
        s = alpha * t.std(correction=0)
    s32 = float(torch.as_tensor(s, dtype=torch.float32))  # the value stored and used for reconstruction
    return mask.reshape(value.shape), (t > 0).reshape(value.shape), s32


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.norm())
    return float(err.norm()) / den if den > 0 else float(err.norm())


def _publish(tmp: Path, out_dir: Path, names: tuple[str, ...]) -> None:
    """Move a complete temporary folder's files into `out_dir` (a rename when it does not exist)."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    for name in names:
        os.replace(tmp / name, out_dir / name)


def _temp_next_to(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def compress_adapter(src_dir: str | Path, out_dir: str | Path, density: float, scale: str = "mean_abs",
                     base_model: nn.Module | None = None, alpha: float = 1.0) -> dict:
    """Write `src_dir`'s adapter ComPEFT-compressed to `out_dir`/compeft_model.safetensors; return a summary."""
    density = _check_options(density, scale, alpha)
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config, config_text, tensors, bytes_before = _read_source(src_dir)
    refs = references(base_model, config, tensors)
    stored: dict[str, torch.Tensor] = {}
    infos: dict[str, dict] = {}
    per_tensor: dict[str, dict] = {}
    for key, value in tensors.items():
        ref = refs[key]
        if not _is_ternary(value, ref):
            stored[f"{key}::raw"] = value
            infos[key] = {"kind": "raw"}
            per_tensor[key] = {"kind": "raw", "numel": value.numel(), "kept": value.numel(), "rel_error": 0.0,
                               "task_rel_error": 0.0}
            continue
        mask, positive, s = compress_tensor(value, ref, density, scale, alpha)
        stored.update(packing.ternary_entries(key, mask, positive, s))
        infos[key] = {"kind": "ternary", "shape": list(value.shape), "dtype": packing.dtype_name(value.dtype),
                      "reference": ref}
        signs = packing.ternary_signs(mask, positive[mask])
        x_hat = packing.reconstruct(ref, s, signs, value.dtype).float()
        x = value.float()
        per_tensor[key] = {"kind": "ternary", "numel": value.numel(), "kept": int(mask.sum()), "scale": s,
                           "reference": ref, "rel_error": _rel(x_hat - x, x),
                           "task_rel_error": _rel(x_hat - x, x - ref)}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "density": repr(density),
                "scale_rule": scale, "alpha": repr(float(alpha)), "method": method_for_config(config).name,
                "reference_source": "zero" if base_model is None else "base_model",
                "adapter_config": config_text, "tensors": json.dumps(infos, sort_keys=True)}
    tmp = _temp_next_to(out_dir)
    try:
        packing.write_file(tmp / COMPRESSED_NAME, stored, metadata)
        _publish(tmp, out_dir, (COMPRESSED_NAME,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bytes_after = (out_dir / COMPRESSED_NAME).stat().st_size
    return {"bytes_before": bytes_before, "bytes_after": bytes_after, "ratio": bytes_before / bytes_after,
            "payload_before": sum(v.numel() * v.element_size() for v in tensors.values()),
            "payload_after": sum(v.numel() * v.element_size() for v in stored.values()),
            "density": density, "scale": scale, "alpha": float(alpha), "method": metadata["method"],
            "reference_source": metadata["reference_source"], "tensors": per_tensor}


def read_compressed(src_dir: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json text, reconstructed tensors, header metadata) of a compressed folder."""
    path = Path(src_dir) / COMPRESSED_NAME
    meta, tensors = packing.read_file(path)
    try:
        AdapterConfig.from_dict(json.loads(meta["adapter_config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterLoadError(f"{path}: the stored adapter_config is not valid JSON ({exc})") from None
    return meta["adapter_config"], tensors, meta


def decompress_adapter(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the compressed adapter in `src_dir` as a normal adapter folder `out_dir`; return its path."""
    config_text, tensors, _ = read_compressed(src_dir)
    out_dir = Path(out_dir)
    tmp = _temp_next_to(out_dir)
    try:
        (tmp / CONFIG_NAME).write_text(config_text)
        packing.write_file(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        _publish(tmp, out_dir, (CONFIG_NAME, WEIGHTS_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_compressed(model_or_base: nn.Module, src_dir: str | Path, adapter_name: str = "default",
                    is_trainable: bool = False) -> AdaptedModel:
    """Load a compressed adapter into an AdaptedModel (added to it) or onto a plain base model."""
    with tempfile.TemporaryDirectory(prefix=".compeft.") as tmp:
        folder = decompress_adapter(src_dir, Path(tmp) / "adapter")
        if isinstance(model_or_base, AdaptedModel):
            model_or_base.load_adapter(folder, adapter_name, is_trainable=is_trainable)
            return model_or_base
        return AdaptedModel.from_pretrained(model_or_base, folder, adapter_name, is_trainable=is_trainable)
