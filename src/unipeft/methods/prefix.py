"""Prefix tuning (Li & Liang): trainable key/value prefixes for every attention layer.

The prefix is one (num_virtual_tokens x num_layers*2*token_dim) tensor, optionally produced by
an MLP from a smaller embedding (`prefix_projection`, a training-time reparametrisation); it
is handed to the model as `past_key_values` (a DynamicCache) with the attention mask extended
by the prefix length, exactly as PEFT does. Models whose top-level forward has no
`past_key_values` (BERT classifiers) get it at their backbone through a one-call hook.

With the KV cache (generation): an empty cache passed in (transformers' generate makes one) is
filled with the prefix; a filled one already holds it, so only the mask grows by the prefix.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError, TargetError
from ..core.registry import Capabilities, register
from .prompts import (PromptLearningConfig, ReparametrizedPrompt, _model_config, cache_length, extend_cached_mask,
                      extend_masks, is_input_embedding)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: `num_virtual_tokens` trainable keys and values per layer (MLP-reparametrised if
    `prefix_projection`, hidden width `encoder_hidden_size`)."""

    peft_class = "PrefixTuningConfig"
    peft_type = "PREFIX_TUNING"
    peft_inert = {"num_transformer_submodules": 1, "init_weights": None}

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def resolved_fields(self, model, targets) -> dict:
        out = super().resolved_fields(model, targets)
        data = _model_config(model)
        dim, heads = out["token_dim"], out["num_attention_heads"]
        if out["num_layers"] is None or heads is None:
            raise TargetError(f"PrefixTuningConfig: cannot read the layer and head counts from "
                              f"{type(model).__name__}'s config; set num_layers and num_attention_heads")
        if data.get("num_key_value_heads") and data["num_key_value_heads"] != heads:
            # Grouped-query attention caches fewer heads: size the prefix by the key/value heads (as PEFT).
            head_dim = data.get("head_dim") or dim // heads
            dim, heads = head_dim * data["num_key_value_heads"], data["num_key_value_heads"]
        if dim % heads:
            raise ConfigError(f"PrefixTuningConfig: token_dim {dim} is not divisible by num_attention_heads {heads}")
        return {**out, "token_dim": dim, "num_attention_heads": heads,
                "encoder_hidden_size": self.encoder_hidden_size or dim}


def _backbone_with_cache(model: nn.Module) -> nn.Module | None:
    """The model itself if its forward takes past_key_values, else its first child that does."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return None
    for _, child in model.named_children():
        if "past_key_values" in inspect.signature(child.forward).parameters:
            return child
    raise TargetError(f"prefix tuning needs a model that takes past_key_values; {type(model).__name__} "
                      f"and its children do not")


class PrefixDelta(ReparametrizedPrompt):
    """Keys/values per layer, given to the model as a DynamicCache (PEFT's PrefixEncoder layout)."""

    def __init__(self, base: nn.Embedding, config: PrefixTuningConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        width = config.num_layers * 2 * self.token_dim
        self.projection = config.prefix_projection and not config.inference_mode
        if self.projection:
            h = config.encoder_hidden_size or self.token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim)
            self.transform = nn.Sequential(nn.Linear(self.token_dim, h), nn.Tanh(), nn.Linear(h, width))
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, width)

    def encode(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.projection else w

    def export_state(self) -> dict[str, torch.Tensor]:
        if not self.projection:  # the embedding is the prefix itself: PEFT's single tensor
            return {"prompt_embeddings": self.embedding.weight}
        return super().export_state()

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.projection:
            with torch.no_grad():
                self.embedding.weight.copy_(tensors["prompt_embeddings"])
            return
        super().import_state(tensors)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """PEFT's layout: (n, L*2*d) -> L pairs of (batch, heads, n, head_dim)."""
        n, heads = self.num_virtual_tokens, self.num_heads
        kv = self.prompt().to(dtype).view(n, self.num_layers * 2, heads, self.token_dim // heads)
        kv = kv.unsqueeze(0).expand(batch, -1, -1, -1, -1).permute(2, 0, 3, 1, 4).split(2)
        return [(pair[0], pair[1]) for pair in kv]

    def past_key_values(self, batch: int, dtype: torch.dtype):
        """The prefix as a DynamicCache."""
        from transformers import DynamicCache

        return DynamicCache(tuple(self.key_values(batch, dtype)))

    def prepare_inputs(self, model, kwargs: dict):
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ConfigError("a prefix adapter needs input_ids= or inputs_embeds= in the model call")
        batch = (ids if ids is not None else embeds).shape[0]
        dtype = embeds.dtype if embeds is not None else self.embedding.weight.dtype
        n = self.num_virtual_tokens
        given = kwargs.get("past_key_values")
        past = cache_length(given)
        if kwargs.get("position_ids") is not None:  # positions continue after the prefix (PEFT)
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if past:  # the cache starts with the prefix an earlier call put there
            if past < n:
                raise ConfigError(f"prefix adapter at '{self.path}': past_key_values holds {past} positions, fewer "
                                  f"than its {n} prefix positions; pass a cache made by an earlier call through it")
            extend_cached_mask(kwargs, batch, n, past, (ids if ids is not None else embeds).shape[1])
            return kwargs, None
        extend_masks(kwargs, batch, n, token_types=False)  # token types cover the real tokens only
        if given is None:
            cache = self.past_key_values(batch, dtype)
        elif hasattr(given, "update"):  # an empty Cache: fill it in place (the caller keeps using it)
            for layer, (key, value) in enumerate(self.key_values(batch, dtype)):
                given.update(key, value, layer)
            cache = given
        else:
            raise ConfigError(f"prefix adapter at '{self.path}': past_key_values must be a transformers Cache, "
                              f"got {type(given).__name__}")
        backbone = _backbone_with_cache(model.base_model)
        if backbone is None:
            kwargs["past_key_values"] = cache
            return kwargs, None

        def inject(module, args, kw):
            handle.remove()  # one call only
            kw["past_key_values"] = cache
            return args, kw

        handle = backbone.register_forward_pre_hook(inject, with_kwargs=True)
        return kwargs, lambda out: (handle.remove(), out)[1]


register("prefix_tuning", PrefixTuningConfig, PrefixDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True, quantized_base=True),
         default_targets=is_input_embedding)
