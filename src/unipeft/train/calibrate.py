"""The calibrate step of `unipeft train`: N batches of the training split for data-aware inits.

When the method's config needs calibration data (`needs_calibration()`: CorDA, EVA, LoRA-GA, ...),
`calibration.batches` batches of the TRAINING split (never valid/test) are drawn in a seeded order,
collated exactly as the trainer collates them (with labels, which gradient-based inits need) and
streamed once through the frozen base before the adapter is built (core/calibration.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ..data.encode import EncodedSet, collate, encode_split


def _init_name(method: dict[str, Any]) -> str:
    return f" (method.init={method['init']!r})" if "init" in method else ""


def calibration_batches(cfg: Any, train_set: EncodedSet, pad_id: int, need: str | None) -> Iterator[dict] | None:
    """A generator of `cfg.calibration.batches` collated training batches when `need` is set, else None;
    ConfigError naming the field when the method needs data and the run config gives none."""
    if not need:
        return None
    n = cfg.calibration.batches
    if n is None:
        raise ConfigError(f"method {cfg.method_name!r}{_init_name(cfg.method)} needs calibration data ({need}): "
                          f"set `calibration: {{batches: 8}}` in the run config (batches of the training split "
                          f"streamed through the base before the adapter is built)")
    if not len(train_set):
        raise ConfigError("calibration: the training split is empty")
    size = cfg.calibration.batch_size or cfg.batch_size
    order = np.random.default_rng(cfg.seed).permutation(len(train_set))

    def batches() -> Iterator[dict]:
        for i in range(n):
            idx = order[(i * size) % len(order):][:size]  # wraps around a split smaller than n x size
            if len(idx) < size:
                idx = np.concatenate([idx, order[:size - len(idx)]])
            yield collate([train_set.rows[j] for j in idx], pad_id)
    return batches()


def run_calibration(cfg: Any, splits: Any, tokenizer: Any) -> Iterator[dict] | None:
    """The calibration batches of run `cfg` (None when its method needs none): the same batches for
    the same config and data, so reloading a finished run rebuilds the same init (and base residual)."""
    need = cfg.strategy.needs_calibration()
    if not need:
        return None
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    train = encode_split(tokenizer, splits.train, cfg.data.max_length, cfg.data.chat_template)
    return calibration_batches(cfg, train, int(pad), need)
