"""Cartridges (Eyuboglu et al., 2025): a trained KV cache, served as a prefix of every attention layer.

The adapter is the prefix itself: `num_virtual_tokens` keys and values per layer, stored flat as
(n x num_layers*2*d) exactly like a prefix-tuning prefix without projection and handed to the model
as `past_key_values`. The first `num_frozen_tokens` positions do not train (the paper keeps the first
token fixed as an attention sink). It is meant to be initialised from the cache of a real prefill:
`initialize_kv_prefix_from_past_key_values(model, past_key_values)` copies the first n cached
positions of a base-model run into the adapter. On disk: PEFT's one tensor `prompt_embeddings`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import non_negative_int
from ..core.registry import Capabilities, register
from .prefix import PrefixDelta, PrefixTuningConfig
from .prompts import is_input_embedding

_PREFIX_ONLY = ("prefix_projection", "encoder_hidden_size")  # prefix tuning's fields Cartridge lacks


@dataclass
class CartridgeConfig(PrefixTuningConfig):
    """Cartridge: a directly trained prefix KV cache of `num_virtual_tokens` positions, the first
    `num_frozen_tokens` of them fixed."""

    peft_class = "CartridgeConfig"
    peft_type = "CARTRIDGE"
    peft_inert = {"num_transformer_submodules": 1}

    num_frozen_tokens: int = non_negative_int(1)

    def validate(self) -> None:
        super().validate()
        if self.prefix_projection:
            raise ConfigError("CartridgeConfig.prefix_projection: a cartridge is the KV cache itself; expected "
                              "False, got True (use PrefixTuningConfig for an MLP-projected prefix)")
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise ConfigError(f"CartridgeConfig.num_frozen_tokens: expected at most num_virtual_tokens "
                              f"({self.num_virtual_tokens}), got {self.num_frozen_tokens}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _PREFIX_ONLY:
            out.pop(key, None)
        return out

    @classmethod
    def _from_peft_dict(cls, data: dict[str, Any]) -> "CartridgeConfig":
        return super()._from_peft_dict({k: v for k, v in data.items() if k not in _PREFIX_ONLY or v})


class CartridgeDelta(PrefixDelta):
    """`frozen_embedding` (buffer, the first k positions) and `embedding` (the trained n - k positions);
    the prefix is their concatenation, N(0, 1) at init as in PEFT."""

    def __init__(self, base: nn.Embedding, config: CartridgeConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        k = config.num_frozen_tokens
        full = self.embedding.weight.detach()
        self.register_buffer("frozen_embedding", full[:k].clone())
        self.embedding = nn.Embedding(self.num_virtual_tokens - k, full.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(full[k:])
        self.num_frozen_tokens = k

    def encode(self) -> torch.Tensor:
        w = self.embedding.weight
        return torch.cat((self.frozen_embedding.to(w.dtype), w), dim=0)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.encode().detach()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        full, k = tensors["prompt_embeddings"], self.num_frozen_tokens
        with torch.no_grad():
            self.frozen_embedding.copy_(full[:k].to(self.frozen_embedding.dtype))
            self.embedding.weight.copy_(full[k:].to(self.embedding.weight.dtype))


def _legacy_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(cache, (tuple, list)):
        return [(layer[0], layer[1]) for layer in cache]
    if hasattr(cache, "layers"):  # transformers' Cache: one entry per layer with keys / values
        return [(layer.keys, layer.values) for layer in cache.layers]
    raise ConfigError(f"past_key_values: expected a transformers Cache or (key, value) pairs per layer, "
                      f"got {type(cache).__name__}")


def initialize_kv_prefix_from_past_key_values(model, past_key_values, adapter_name: str | None = None
                                              ) -> torch.Tensor:
    """Copy the first n positions of a batch-1 cache (a base-model prefill) into a cartridge adapter of
    AdaptedModel `model`; returns the packed (n x num_layers*2*d) prefix that was loaded."""
    name = adapter_name or model.active_adapter
    deltas = [d for d in model.deltas(name) if isinstance(d, CartridgeDelta)]
    if not deltas:
        raise ConfigError(f"adapter '{name}' is not a cartridge adapter")
    delta = deltas[0]
    layers = _legacy_layers(past_key_values)
    n = delta.num_virtual_tokens
    if len(layers) != delta.num_layers:
        raise ConfigError(f"past_key_values has {len(layers)} layers; the cartridge has {delta.num_layers}")
    key = layers[0][0]
    if key.dim() != 4 or key.shape[0] != 1 or key.shape[2] < n:
        raise ConfigError(f"past_key_values: expected keys of shape (1, heads, >= {n}, head_dim) from a "
                          f"single-sequence prefill, got {tuple(key.shape)}")
    packed = torch.stack([t[0, :, :n].transpose(0, 1) for pair in layers for t in pair], dim=1)
    packed = packed.reshape(n, -1)
    if packed.shape[1] != delta.embedding.weight.shape[1] or key.shape[1] != delta.num_heads:
        raise ConfigError(f"past_key_values: {key.shape[1]} heads of width {key.shape[3]} do not fit the "
                          f"cartridge's {delta.num_heads} heads of width {delta.token_dim // delta.num_heads}")
    delta.import_state({"prompt_embeddings": packed})
    return packed


register("cartridge", CartridgeConfig, CartridgeDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True,
                      quantized_base=True),
         default_targets=is_input_embedding, exports=(initialize_kv_prefix_from_past_key_values,))
