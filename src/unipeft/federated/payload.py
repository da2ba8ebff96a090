"""What travels between server and clients: adapter tensors as safetensors bytes in one Flower Array.

`pack` turns {key: tensor} into the bytes of a safetensors file (the format the adapter is saved in) and
wraps them as a uint8 Array of a Flower ArrayRecord; `unpack` reverses it. `check_update` is the server's
gate: a client's reply is accepted only if it decodes, names only keys of the global adapter, every tensor
has the global tensor's shape and dtype and is finite, and it is not larger than the cap. The reason of a
rejection is returned (the server logs it and leaves the global adapter as it was).
"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

KEY = "adapter"


def pack(tensors: dict[str, torch.Tensor]):
    """An ArrayRecord holding the safetensors bytes of `tensors`."""
    from flwr.app import Array, ArrayRecord
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return ArrayRecord({KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def payload_bytes(record) -> int:
    """Size of the safetensors bytes in an ArrayRecord made by `pack`."""
    return int(record[KEY].numpy().nbytes)


def unpack(record) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord made by `pack` (raises ValueError when it is not one)."""
    if KEY not in record:
        raise ValueError(f"no '{KEY}' array in the record (keys: {sorted(record.keys())})")
    blob = record[KEY].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"'{KEY}' must be safetensors bytes (uint8 vector), got {blob.dtype} {blob.shape}")
    try:
        return dict(st_load(blob.tobytes()))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"not a safetensors payload: {err}") from None


def check_update(record, reference: dict[str, torch.Tensor], max_bytes: int,
                 decode=None) -> tuple[dict | None, str | None]:
    """(tensors, None) for an acceptable client update, else (None, the reason it is rejected).
    `decode(tensors, reference) -> (tensors, reason)` first turns an encoded update (compression.py) into tensors."""
    try:
        size = payload_bytes(record)
    except (KeyError, TypeError, ValueError) as err:
        return None, f"malformed payload: {err}"
    if size > max_bytes:
        return None, f"oversized update: {size} bytes > limit {max_bytes}"
    try:
        tensors = unpack(record)
    except ValueError as err:
        return None, f"malformed payload: {err}"
    if decode is not None:
        tensors, reason = decode(tensors, reference)
        if reason is not None:
            return None, reason
    unknown = sorted(set(tensors) - set(reference))
    if unknown:
        return None, f"unknown keys: {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(unknown)})"
    for key, t in tensors.items():
        ref = reference[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return None, (f"wrong shape for {key}: {tuple(t.shape)} {t.dtype}, "
                          f"expected {tuple(ref.shape)} {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return None, f"non-finite values in {key}"
    return tensors, None


def full_state(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's whole adapter: the keys it sent (those it changed), the global values for the rest."""
    return {k: update.get(k, v) for k, v in reference.items()}


def changed(local: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors training changed: what a client sends (a frozen A of FFA-LoRA never travels)."""
    return {k: v for k, v in local.items() if k not in reference or not torch.equal(v, reference[k])}
