"""UniPELT's gated prefix: prefix tuning whose per-layer keys/values are scaled by an input-dependent gate.

    gate_l = mean over the sequence of sigmoid(W_l h_l + b_l)    (per example: shape (batch, 1), or (batch, 2)
                                                                  with separate key/value gates; padded
                                                                  positions count, as in AdapterHub)
    layer l attends to [gate_l * P_k,l ; K_l] and [gate_l * P_v,l ; V_l]

where h_l is the hidden_states input of layer l's attention module and P_l that layer's prefix keys/values,
as AdapterHub computes it (the gate scales the prefix entries only; the prefix positions stay in the
attention mask, so a zero gate leaves zero keys, each still taking softmax weight exp(0), with zero values).

The prefix itself is unipeft's prefix tuning (`PrefixDelta` of methods/prefix.py: the same embedding, MLP
reparametrisation and DynamicCache layout), held with the gates in the adapter's bank. The prefix enters as
`past_key_values`, before any layer runs, so for each model call (or generation step) `prepare_inputs` hooks
every layer's attention module: the pre-hook computes the gate from that call's hidden_states and writes
gate * prefix into the first `prefix_length` positions of that layer's cache entry (recomputed from the
unscaled prefix each call, so a generation step never rescales an earlier step's values). A hook on the
model removes the hooks when the call returns or raises. Gradient checkpointing recomputes layers after
the call, without the hooks: it is refused while training.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.errors import ConfigError, TargetError
from ...core.targets import logical_modules
from ..prefix import PrefixDelta, PrefixTuningConfig
from ..prompts import is_input_embedding

_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")


def _takes(module: nn.Module) -> str | None:
    """The cache argument of an attention module's forward (None: not an attention module with a cache)."""
    params = inspect.signature(module.forward).parameters
    if "hidden_states" not in params:
        return None
    return next((name for name in _CACHE_ARGS if name in params), None)


def attention_paths(model: nn.Module, num_layers: int) -> list[str]:
    """Paths of the self-attention modules that update the cache, one per layer index 0..num_layers-1.

    An attention module is one with an integer `layer_idx` whose forward takes hidden_states and a cache;
    cross-attention is left out; of nested candidates with one index the innermost is the one updating."""
    found: dict[int, str] = {}
    for path, module in logical_modules(model):
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or isinstance(idx, bool) or _takes(module) is None:
            continue
        if "crossattention" in path or getattr(module, "is_cross_attention", False):
            continue
        if idx not in found or path.startswith(found[idx] + "."):
            found[idx] = path
    missing = [i for i in range(num_layers) if i not in found]
    if missing:
        raise TargetError(f"UniPELTConfig: the gated prefix needs one self-attention module per layer (a module "
                          f"with layer_idx whose forward takes hidden_states and past_key_values); none found for "
                          f"layers {missing[:5]} of {type(model).__name__}")
    return [found[i] for i in range(num_layers)]


def input_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's one input token embedding (path, module), where prefix tuning reads its widths."""
    found = [(p, m) for p, m in logical_modules(model) if is_input_embedding(p, m)]
    if len(found) != 1:
        raise TargetError(f"UniPELTConfig: the gated prefix needs the model's one input token embedding, found "
                          f"{[p for p, _ in found]}")
    return found[0]


def _gate(d: int, outputs: int) -> nn.Linear:
    """AdapterHub's prefix gate: weight N(0, 0.02), bias PyTorch's default uniform(+-1/sqrt(d))."""
    gate = nn.Linear(d, outputs)
    nn.init.normal_(gate.weight, std=0.02)
    return gate


class GatedPrefixBank(Bank):
    """The prefix (`prefix`, a PrefixDelta used for its encoder and cache layout) and one gate per layer."""

    def __init__(self, model: nn.Module, config, driver: str) -> None:
        super().__init__()
        path, embedding = input_embedding(model)
        spec = PrefixTuningConfig(num_virtual_tokens=config.prefix_length, prefix_projection=not config.prefix_flat,
                                  encoder_hidden_size=config.prefix_bottleneck_size)
        spec = spec.frozen_copy(**spec.resolved_fields(model, [(path, embedding)]))
        self.prefix = PrefixDelta(embedding, spec, path)
        self.paths = attention_paths(model, spec.num_layers)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None) or embedding.embedding_dim
        outputs = 1 if config.prefix_shared_gating else 2
        self.gates = nn.ModuleList([_gate(hidden, outputs) for _ in self.paths])
        self.driver = driver  # the site whose delta runs prepare_inputs for the adapter
        self.length = config.prefix_length
        object.__setattr__(self, "_handles", [])

    # ---- the gate --------------------------------------------------------------------------------
    def gate_values(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, 1 or 2): mean over the sequence of sigmoid(gate_l(hidden))."""
        gate = self.gates[layer]
        return torch.sigmoid(gate(hidden.to(gate.weight.dtype))).mean(dim=1)

    # ---- the per-call hooks ----------------------------------------------------------------------
    def release(self, *_: Any) -> None:
        """Remove this call's hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, layer: int, raw: dict):
        n = self.length

        def hook(module, args, kwargs):
            signature = inspect.signature(module.forward)
            bound = signature.bind_partial(*args, **kwargs).arguments
            for name, param in signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    bound.update(bound.pop(name, None) or {})
            hidden = bound.get("hidden_states")
            cache = next((bound[k] for k in _CACHE_ARGS if bound.get(k) is not None), None)
            cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
            entries = getattr(cache, "layers", None)
            if hidden is None or entries is None or layer >= len(entries):
                raise ConfigError(f"UniPELT gated prefix at '{self.paths[layer]}': the attention call has no "
                                  f"hidden_states or no cache holding the prefix")
            entry = entries[layer]
            keys = getattr(entry, "keys", None)
            if getattr(entry, "is_sliding", False) or not torch.is_tensor(keys) or keys.dim() != 4 \
                    or keys.shape[-2] < n:
                raise ConfigError(f"UniPELT gated prefix at '{self.paths[layer]}': layer {layer}'s cache entry "
                                  f"({type(entry).__name__}) does not start with the {n} prefix positions; use a "
                                  f"DynamicCache without sliding windows")
            key = (hidden.shape[0], keys.dtype, keys.device)
            if raw.get("key") != key:  # the unscaled prefix, computed once per call
                raw["key"], raw["kv"] = key, self.prefix.key_values(hidden.shape[0], keys.dtype)
            k, v = raw["kv"][layer]
            g = self.gate_values(layer, hidden)
            gk, gv = g[:, 0].view(-1, 1, 1, 1), g[:, -1].view(-1, 1, 1, 1)
            new_k, new_v = (k.to(keys.device) * gk).to(keys.dtype), (v.to(keys.device) * gv).to(keys.dtype)
            if keys.shape[-2] > n:  # generation steps: the real tokens cached after the prefix stay
                new_k = torch.cat((new_k, keys[..., n:, :]), dim=-2)
                new_v = torch.cat((new_v, entry.values[..., n:, :]), dim=-2)
            entry.keys, entry.values = new_k, new_v
            return args, kwargs
        return hook

    def prepare_inputs(self, model, kwargs: dict):
        """Prefix tuning's inputs (cache + masks), then this call's gate hooks on every attention module."""
        base = model.base_model
        if base.training and layers.activation_checkpointing(base):
            raise ConfigError("UniPELT gated prefix: gradient checkpointing recomputes the attention layers after "
                              "the call, without the gates; disable it (model.gradient_checkpointing_disable())")
        kwargs, post = self.prefix.prepare_inputs(model, kwargs)
        self.release()  # hooks left by an earlier call
        raw: dict = {}
        for layer, path in enumerate(self.paths):
            attn = base.get_submodule(path)
            self._handles.append(attn.register_forward_pre_hook(self._layer_hook(layer, raw), with_kwargs=True))
        # One model call (or one generation step): the hooks go when it returns or raises.
        self._handles.append(base.register_forward_hook(self.release, always_call=True))
        return kwargs, post
