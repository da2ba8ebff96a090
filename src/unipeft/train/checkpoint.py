"""Checkpoints for exact resumption: trainable tensors, optimizer, scheduler, RNG, loop position.

A checkpoint folder is written under a temporary name and renamed when complete, so a
crash while saving never leaves a checkpoint that looks usable. Under FSDP every tensor is
gathered whole before it is written and cut again when read, so a checkpoint has one format
whatever the process count or strategy that wrote it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..core.model import AdaptedModel
from ..core.resize import rebuild_adapter
from .fsdp import full_optimizer_state, full_tensor, is_fsdp, reshard, shard_like, shard_optimizer_state

STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTERS_FILE = "adapters.json"  # each adapter's resolved config: ranks that changed during training


def adapter_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{adapter name: resolved config as PEFT-style dict} of an AdaptedModel ({} for a plain model)."""
    return {n: c.to_dict() for n, c in model.peft_config.items()} if isinstance(model, AdaptedModel) else {}


def restore_adapter_configs(model: nn.Module, saved: dict[str, dict[str, Any]], optimizer: Any) -> None:
    """Rebuild the deltas of every adapter whose saved config differs (e.g. ranks grown or pruned by a
    rank-allocation callback), swapping the optimizer's parameters, before any state is loaded."""
    current = json.loads(json.dumps(adapter_configs(model)))  # as the file holds it (lists, not tuples)
    for name, data in saved.items():
        if name in current and current[name] != data:
            rebuild_adapter(model, name, AdapterConfig.from_dict(data), optimizer)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by its name in `model` (whole, cloned to CPU; FSDP: every process must call)."""
    return {n: full_tensor(p.detach()).to("cpu").contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back; the names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ConfigError(f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                          f"was the config changed since the checkpoint was written?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(shard_like(tensors[n], p))  # FSDP: this process's shard of the whole tensor


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], callbacks: list[dict[str, Any]], accelerator: Any, keep: int) -> Path:
    """Write checkpoint `step-N` (main process writes model/optimizer; each process its RNG)."""
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    sharded = is_fsdp(model)
    if sharded:
        reshard(model)  # the registered parameters are then the shards the optimizer holds
    if main or sharded:  # FSDP: gathering the shards takes every process
        tensors = trainable_state(model)
        optim = full_optimizer_state(optimizer.state_dict()) if sharded else optimizer.state_dict()
    if main:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(),
                    "callbacks": callbacks}, tmp / "optimizer.pt")
        (tmp / ADAPTERS_FILE).write_text(json.dumps(adapter_configs(model), indent=2, sort_keys=True) + "\n")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "world_size": accelerator.num_processes},
                                                           indent=2) + "\n")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, accelerator: Any
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore a checkpoint into model/optimizer/scheduler and this process's RNG; return (state, callbacks)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != accelerator.num_processes:
        # The data order is the same for any world size; only the RNG streams are per process.
        rng_file = path / "rng-0.pt"
    else:
        rng_file = path / f"rng-{accelerator.process_index}.pt"
    if is_fsdp(model):
        reshard(model)  # write into the shards the optimizer holds, not into gathered copies
    elif (path / ADAPTERS_FILE).is_file():  # deltas at the recorded ranks first (not under FSDP: fixed shards)
        restore_adapter_configs(model, json.loads((path / ADAPTERS_FILE).read_text()), optimizer)
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    optim = shard_optimizer_state(blob["optimizer"], optimizer) if is_fsdp(model) else blob["optimizer"]
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state, blob["callbacks"]
