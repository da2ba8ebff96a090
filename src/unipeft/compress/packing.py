"""The bit-packed ternary file format of ComPEFT-compressed adapters (read/write, checked on read).

One safetensors file, `compeft_model.safetensors`, holds every tensor of one adapter. For a tensor
stored as ternary under key K (the adapter file's key) it holds:

  K::mask   uint8 (ceil(numel/8),)  the kept positions, 1 bit per entry of the flattened tensor
                                    (numpy packbits, big-endian bit order, zero padding at the end)
  K::signs  uint8 (ceil(kept/8),)   one bit per kept entry in position order: 1 = positive, 0 = negative
  K::scale  float32 (1,)            the tensor's one scale

and a tensor stored unchanged (integer tensors, and tensors whose reference the reader cannot rebuild) as
  K::raw    the original tensor.

The header metadata (str -> str) holds `format` ("unipeft-compeft"), `format_version` ("1"), `density`,
`scale_rule`, `alpha`, `method`, `reference_source`, `adapter_config` (the source adapter_config.json
text, byte for byte) and `tensors`: JSON {K: {"kind": "ternary"|"raw", "shape": [...], "dtype": "float32",
"reference": 0.0}} where the reference is the constant the ternary part is added to. So the payload of a
ternary tensor is ceil(n/8) + ceil(kept/8) + 4 bytes against n * itemsize bytes uncompressed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.errors import AdapterLoadError

FORMAT_NAME = "unipeft-compeft"
FORMAT_VERSION = "1"
COMPRESSED_NAME = "compeft_model.safetensors"
SUPPORTED_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_REQUIRED_META = ("format", "format_version", "density", "scale_rule", "alpha", "method", "reference_source",
                  "adapter_config", "tensors")


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, 8 flags per byte (big-endian bit order, zero padded)."""
    return torch.from_numpy(np.packbits(flags.reshape(-1).numpy().astype(np.bool_)))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` flags of packed uint8 bytes, as a flat bool tensor."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(np.bool_))


def ternary_entries(key: str, mask: torch.Tensor, positive: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The stored tensors of one ternary tensor: packed mask, packed signs of the kept entries, scale."""
    flat = mask.reshape(-1)
    return {f"{key}::mask": pack_bits(flat), f"{key}::signs": pack_bits(positive.reshape(-1)[flat]),
            f"{key}::scale": torch.tensor([scale], dtype=torch.float32)}


def ternary_signs(mask: torch.Tensor, positive_kept: torch.Tensor) -> torch.Tensor:
    """The float32 tensor of -1/0/+1 given the kept mask and the signs of the kept entries."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = torch.where(positive_kept, 1.0, -1.0)
    return out


def reconstruct(reference: float, scale: float, signs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decompressed tensor: reference + scale * signs, computed in float32, then cast to `dtype`."""
    return (torch.tensor(reference, dtype=torch.float32) + torch.tensor(scale, dtype=torch.float32) * signs).to(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype is recorded under in the header."""
    return str(dtype).removeprefix("torch.")


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the compressed file (the caller writes into a temporary folder)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _fail(path: Path, what: str) -> AdapterLoadError:
    return AdapterLoadError(f"{path}: not a valid {FORMAT_NAME} v{FORMAT_VERSION} file: {what}")


def read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and the decoded tensors {adapter key: tensor} of a compressed file, checked."""
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no {COMPRESSED_NAME} here (not a compressed adapter folder)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            stored = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path}: cannot read safetensors ({exc})") from None
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise _fail(path, f"header metadata lacks {missing}")
    if meta["format"] != FORMAT_NAME or meta["format_version"] != FORMAT_VERSION:
        raise _fail(path, f"format {meta['format']!r} version {meta['format_version']!r} is unknown")
    try:
        infos = json.loads(meta["tensors"])
    except json.JSONDecodeError as exc:
        raise _fail(path, f"'tensors' metadata is not JSON ({exc})") from None
    out = {key: _decode(path, key, info, stored) for key, info in infos.items()}
    extra = set(stored) - {f"{k}::{p}" for k, i in infos.items() for p in _parts(i)}
    if extra:
        raise _fail(path, f"tensors not described in the header: {sorted(extra)[:3]}")
    return meta, out


def _parts(info: dict) -> tuple[str, ...]:
    return ("raw",) if info.get("kind") == "raw" else ("mask", "signs", "scale")


def _decode(path: Path, key: str, info: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """One tensor from its stored parts, every size checked against the header."""
    if not isinstance(info, dict) or info.get("kind") not in ("ternary", "raw"):
        raise _fail(path, f"tensor '{key}' has an unknown kind in the header")
    lost = [f"{key}::{p}" for p in _parts(info) if f"{key}::{p}" not in stored]
    if lost:
        raise _fail(path, f"missing stored tensors {lost}")
    if info["kind"] == "raw":
        return stored[f"{key}::raw"]
    shape, dtype = info.get("shape"), SUPPORTED_DTYPES.get(info.get("dtype"))
    if not isinstance(shape, list) or dtype is None or not isinstance(info.get("reference"), (int, float)):
        raise _fail(path, f"tensor '{key}' has a bad shape/dtype/reference in the header")
    numel = math.prod(shape)
    mask_b, signs_b, scale = (stored[f"{key}::{p}"] for p in ("mask", "signs", "scale"))
    if mask_b.dtype != torch.uint8 or signs_b.dtype != torch.uint8 or mask_b.numel() != math.ceil(numel / 8):
        raise _fail(path, f"'{key}::mask' must hold ceil({numel}/8) uint8 bytes, has {mask_b.numel()} {mask_b.dtype}")
    mask = unpack_bits(mask_b, numel)
    kept = int(mask.sum())
    if signs_b.numel() != math.ceil(kept / 8) or scale.dtype != torch.float32 or scale.numel() != 1:
        raise _fail(path, f"'{key}' signs/scale do not match its {kept} kept entries")
    signs = ternary_signs(mask, unpack_bits(signs_b, kept)).reshape(shape)
    return reconstruct(float(info["reference"]), float(scale[0]), signs, dtype)
