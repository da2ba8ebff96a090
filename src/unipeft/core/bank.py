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
    """Base class for an adapter's shared module (any nn.Module works; this one documents the role)."""


def bank_state(bank: nn.Module) -> dict[str, torch.Tensor]:
    """{file key: tensor} of a bank's state."""
    return {f"{BANK_PREFIX}{k}": v for k, v in bank.state_dict().items()}
