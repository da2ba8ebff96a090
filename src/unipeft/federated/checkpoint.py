"""Per-round checkpoints of the global adapter, and resuming from the newest one.

`<output_dir>/round-0003/` holds `adapter/` (the global adapter after round 3, in the format `unipeft`
saves) and `state.json` (the round, the history so far, FedKSeed's global coefficients). A checkpoint is
written to a temporary sibling and renamed into place, so a server killed mid-write leaves the previous
round as the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..core.state import read_adapter, save_adapters

STATE = "state.json"


def round_dir(output_dir: str | Path, rnd: int) -> Path:
    return Path(output_dir) / f"round-{rnd:04d}"


def save_round(output_dir: str | Path, rnd: int, model, state: dict[str, Any]) -> Path:
    """Write round `rnd`'s checkpoint atomically; returns its folder."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{rnd:04d}.", dir=out))
    try:
        save_adapters(model, tmp / "adapter", ["default"])
        (tmp / STATE).write_text(json.dumps({"round": rnd, **state}, indent=1))
        target = round_dir(out, rnd)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def latest_round(output_dir: str | Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(round, global adapter tensors, state) of the newest complete checkpoint, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = sorted(p for p in out.glob("round-[0-9][0-9][0-9][0-9]") if (p / STATE).is_file())
    if not done:
        return None
    state = json.loads((done[-1] / STATE).read_text())
    _, tensors = read_adapter(done[-1] / "adapter")
    return int(state["round"]), tensors, state
