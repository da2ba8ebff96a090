"""TrainableTokens: train only chosen rows of an embedding matrix (PEFT's TRAINABLE_TOKENS).

The delta is weight-side: the embedding runs with its weight whose rows `token_indices` are
replaced by the trainable tensor `trainable_tokens_delta` (n_tokens, dim). It starts as a copy of
those rows, so a fresh adapter is the identity. The file holds the rows themselves, not a
difference, as PEFT's does: an adapter loaded onto a base whose rows were re-initialised (a resized
vocabulary) still sets exactly the trained values. Merging adds the rows' difference to the weight.

Tied weights: an output head that shares the embedding's weight (GPT-2's lm_head) must use the same
trained rows, or the logits of those tokens would still read the old ones. When both modules are
targeted, the adapter's bank hands one tensor to both deltas: the first delta owns and trains it, the
other follows it and saves a copy under its own path (PEFT's file has both keys). Targeting only one
of two tied modules is refused, naming the other.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, TargetError
from ..core.fields import Rule, ruled
from ..core.registry import Capabilities, register
from ..core.targets import logical_modules

KEY = "trainable_tokens_delta"  # PEFT's name of the trained rows
# Names of input embeddings, for the default selection (PEFT asks the model's get_input_embeddings).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embed",
                    "embedding", "embeddings")


class _PlainLinearMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return type(obj) is nn.Linear


class PlainLinear(metaclass=_PlainLinearMeta):
    """Matches a plain nn.Linear (a tied LM head), not its quantized subclasses: their packed rows cannot
    be replaced."""


def _distinct_indices(value) -> bool:
    return (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
            and len(set(value)) == len(value))


@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Train the embedding rows of `token_indices` only; `init_weights=False` starts them random.

    With target_modules=None the input embedding is adapted (a module named like `embed_tokens`,
    `wte` or `word_embeddings`). An empty `token_indices` (PEFT's default) is accepted here and
    refused when the adapter is built."""

    peft_class = "TrainableTokensConfig"
    peft_type = "TRAINABLE_TOKENS"
    not_in_peft = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
    token_indices: list[int] = ruled([], Rule(_distinct_indices, "a list of distinct token indices (integers >= 0)"),
                                     factory=True)
    init_weights: bool = True

    def make_bank(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> "TiedRows | None":
        """The rows' sharing point when targets share one weight (tied embeddings); None otherwise."""
        return TiedRows.build(model, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Every other token of a small vocabulary (every toy model has 64 or more), so most inputs hold some."""
        return {"token_indices": list(range(0, 64, 2))}


class TiedRows(Bank):
    """One trainable rows tensor per weight that several targets share. Holds no state of its own
    (nothing is saved under `bank.`): the first delta of each weight owns, trains and saves it."""

    def __init__(self) -> None:
        super().__init__()
        # id(weight) -> the shared rows; a plain dict, so the tensor is registered once, in its owner.
        self.rows: dict[int, nn.Parameter] = {}

    @classmethod
    def build(cls, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> "TiedRows | None":
        """A bank when some targets share their weight; TargetError when a sharer is not targeted."""
        sharers: dict[int, list[str]] = {}
        for path, module in logical_modules(model):
            weight = dict(module.named_parameters(recurse=False)).get("weight")
            if weight is not None:
                sharers.setdefault(id(weight), []).append(path)
        chosen = {path for path, _ in targets}
        tied = False
        for path, module in targets:
            paths = sharers.get(id(module.weight), [])
            others = [p for p in paths if p not in chosen]
            if others:
                raise TargetError(f"TrainableTokensConfig: the weight of '{path}' is tied to {others}, which would "
                                  f"keep reading the untrained rows; add {others} to target_modules so both use "
                                  f"the trained rows")
            tied |= len(paths) > 1
        return cls() if tied else None

    def claim(self, weight: torch.Tensor, make: Callable[[], nn.Parameter]) -> tuple[nn.Parameter, bool]:
        """(the rows for `weight`, whether the caller is their owner: the first to ask)."""
        key = id(weight)
        if key in self.rows:
            return self.rows[key], False
        self.rows[key] = make()
        return self.rows[key], True


class TrainableTokensDelta(Delta):
    """weight' = weight with rows `token_indices` replaced by `trainable_tokens_delta` (weight-side).

    On an nn.Embedding the rows are token vectors; on a bias-free nn.Linear (a tied LM head) they are
    the output units of those tokens."""

    kind = "weight"
    weight_dependent = True  # delta_weight reads the base rows: core undoes exactly what it merged

    def __init__(self, base: nn.Module, config: TrainableTokensConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        weight = base.weight
        indices = list(config.token_indices)
        if not indices:
            raise ConfigError("TrainableTokensConfig.token_indices: expected at least one token index, got []")
        outside = [i for i in indices if i >= weight.shape[0]]
        if outside:
            raise TargetError(f"TrainableTokensConfig.token_indices: {outside[:5]} are out of range for '{path}', "
                              f"which has {weight.shape[0]} rows")
        if isinstance(base, nn.Linear) and base.bias is not None:
            raise TargetError(f"TrainableTokens: '{path}' is a Linear with a bias; PEFT runs such a layer without "
                              f"its bias, so only bias-free heads (tied LM heads) are supported")
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long, device=weight.device),
                             persistent=False)

        def make() -> nn.Parameter:
            with torch.no_grad():
                start = (weight[self.token_indices] if config.init_weights
                         else torch.randn(len(indices), weight.shape[1], device=weight.device))
            return nn.Parameter(start.detach().clone().float())

        rows, owner = bank.claim(weight, make) if bank is not None else (make(), True)
        # The owner registers the rows (trained, in parameters()); a follower only refers to them.
        object.__setattr__(self, "_follows", None if owner else rows)
        if owner:
            self.trainable_tokens_delta = rows

    @property
    def rows(self) -> torch.Tensor:
        """The trained rows: this delta's own, or those of the tied module it follows."""
        return self.trainable_tokens_delta if self._follows is None else self._follows

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = params["weight"]
        return {"weight": weight.index_copy(0, self.token_indices, self.rows.to(weight.dtype))}

    def delta_weight(self) -> dict[str, torch.Tensor]:
        if self._follows is not None:  # the owner's merge writes the shared weight once
            return {}
        weight = self.base.weight
        return {"weight": weight.index_copy(0, self.token_indices, self.rows.to(weight.dtype)) - weight}

    def export_state(self) -> dict[str, torch.Tensor]:
        return {KEY: self.rows}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.rows.copy_(tensors[KEY].to(self.rows.dtype))


def _input_embedding(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS


register("trainable_tokens", TrainableTokensConfig, TrainableTokensDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Embedding, PlainLinear), peft_compatible=True),
         default_targets=_input_embedding)
