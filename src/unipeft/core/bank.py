"""Banks: the module one adapter's deltas share (shared random bases, vector banks, routers).

`AdapterConfig.make_bank(model, targets)` builds it once per adapter, before any delta; core
hands the same object to every delta of that adapter (`Delta.bank`), registers it under
`AdaptedModel.banks[name]` so it trains with the adapter, and saves its state at the file's
root under `bank.<key>` (the per-site tensors stay under their module paths).
"""
from __future__ import annotations

import torch
from torch import nn

BANK_PREFIX = "bank."


class Bank(nn.Module):
    """Base class for an adapter's shared module (any nn.Module works; this one documents the role).

    Subclasses may rename their on-disk keys (`saved_key`, e.g. PEFT's `base_model.vera_A`) and
    check loaded tensors before anything is written (`check_state`, e.g. a seeded basis that
    must equal what the config's seed regenerates). Non-persistent buffers are not saved.
    """

    def saved_key(self, key: str) -> str:
        """The file key of state_dict key `key` (default: `bank.<key>`)."""
        return f"{BANK_PREFIX}{key}"

    def check_state(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Problems with loaded tensors ({state_dict key: tensor}, shapes already checked); [] when fine."""
        return []


def bank_keys(bank: nn.Module) -> dict[str, str]:
    """{file key: state_dict key} of a bank's saved state."""
    name = bank.saved_key if isinstance(bank, Bank) else (lambda k: f"{BANK_PREFIX}{k}")
    return {name(k): k for k in bank.state_dict()}


def bank_state(bank: nn.Module) -> dict[str, torch.Tensor]:
    """{file key: tensor} of a bank's state."""
    state = bank.state_dict()
    return {file_key: state[key] for file_key, key in bank_keys(bank).items()}
