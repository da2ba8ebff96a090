"""ComPEFT-compressed client updates (`strategy.compeft_density`): a client sends its update, not its adapter,
as ternary bits.

For every tensor training changed, the update d = local - global is kept at its `density` largest-magnitude
entries, each stored as a sign, with one float32 scale (the mean |d| of the kept entries): ComPEFT's
`compress_tensor` (compress/compeft.py) and bit packing (compress/packing.py), 2 bits or less per entry instead
of 32. The server rebuilds global + scale * signs; the payload travels as the same safetensors bytes.
"""
from __future__ import annotations

import math

import torch

from ..compress import packing
from ..compress.compeft import compress_tensor

SUFFIXES = ("::mask", "::signs", "::scale")


def encode(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], density: float) -> dict:
    """The packed ternary entries of every tensor in `update` (a client's changed tensors) against `reference`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in update.items():
        mask, positive, scale = compress_tensor(value.float() - reference[key].float(), 0.0, density)
        out.update(packing.ternary_entries(key, mask, positive, scale))
    return out


def decode(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[dict | None, str | None]:
    """(the client's changed tensors, None), or (None, why the payload is not a valid compressed update)."""
    keys = {k.rsplit("::", 1)[0] for k in tensors}
    unknown = sorted(k for k in keys if k not in reference)
    if unknown:
        return None, f"unknown keys: {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(unknown)})"
    out = {}
    for key in sorted(keys):
        parts = [tensors.get(key + s) for s in SUFFIXES]
        if any(p is None for p in parts):
            return None, f"malformed payload: {key} lacks one of {SUFFIXES}"
        mask_bytes, sign_bytes, scale = parts
        ref = reference[key]
        if mask_bytes.dtype != torch.uint8 or mask_bytes.numel() != math.ceil(ref.numel() / 8):
            return None, f"wrong shape for {key}: mask of {mask_bytes.numel()} bytes for {ref.numel()} entries"
        mask = packing.unpack_bits(mask_bytes, ref.numel())
        kept = int(mask.sum())
        if sign_bytes.dtype != torch.uint8 or sign_bytes.numel() != math.ceil(kept / 8) or scale.numel() != 1:
            return None, f"wrong shape for {key}: signs/scale do not match the {kept} kept entries"
        if not bool(torch.isfinite(scale).all()):
            return None, f"non-finite values in {key}::scale"
        signs = packing.ternary_signs(mask.reshape(ref.shape), packing.unpack_bits(sign_bytes, kept))
        out[key] = packing.reconstruct(0.0, float(scale), signs, torch.float32).add_(ref.float()).to(ref.dtype)
    return out, None
