"""Adaption prompts (LLaMA-Adapter, Zhang et al. 2023): gated learned prompts in the top L attention layers.

Each of the top `adapter_layers` self-attention modules gets `adapter_len` learned prompt vectors P
(hidden size wide) and a scalar gate g, zero at init. The layer's query (rotary positions applied)
attends to the prompt's keys and values (the layer's own k/v projections of P) in a separate
softmax; the result, scaled by g and through the output projection, is added to the attention
output:  out = attn(x) + o_proj(g * softmax(q k_P^T / sqrt(d)) v_P).

GPT-2 (fused c_attn, no rotary positions) works the same way except that, as in PEFT, the prompt's
attention output is added without the output projection.

Where it sits: the attention modules of Llama-style models are called with keyword inputs, which a
core site does not wrap, so the adapter lives at the model's input embedding (an identity there) and
acts at the model level: for each model call `prepare_inputs` hooks the chosen attention modules and
a hook on the model removes them when the call ends (also on error). On disk the tensors are PEFT's:
`base_model.model.<attention path>.adaption_prompt` (1, len, hidden) and `.adaption_gate` (1,).
Gradient checkpointing recomputes layers after the call, when the hooks are gone: it is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, TargetError
from ..core.fields import positive_int
from ..core.registry import Capabilities, register
from ..core.targets import logical_modules

# model_type -> the attention modules' name (PEFT's default target_modules per model type).
ATTENTION_NAMES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}
_EMBEDDINGS = ("embed_tokens", "wte")  # the token embeddings of those models
_INTERNAL = ("layer_paths", "projection_bias")  # resolved at adapt time, never written to the file


def is_decoder_embedding(path: str, module: nn.Module) -> bool:
    """Default site: the token embedding of a supported decoder (`embed_tokens` of Llama/Mistral, `wte` of GPT-2)."""
    return isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in _EMBEDDINGS


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter: `adapter_len` gated prompt vectors in each of the top `adapter_layers` attention modules
    (named `attention_module`, PEFT's target_modules; default by model type: "self_attn" for Llama/Mistral,
    "attn" for GPT-2)."""

    peft_class = "AdaptionPromptConfig"
    peft_type = "ADAPTION_PROMPT"
    peft_names = {"attention_module": "target_modules"}
    not_in_peft = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")

    attention_module: str | None = None
    adapter_len: int = positive_int(10)
    adapter_layers: int = positive_int(1)
    # Resolved from the model at adapt time (not on disk): the adapted attention paths, bottom to top,
    # and whether their output projection has a bias (then a zero gate still adds it, as in PEFT).
    layer_paths: list[str] | None = None
    projection_bias: bool | None = None

    def validate(self) -> None:
        super().validate()
        if self.attention_module is not None and (not isinstance(self.attention_module, str)
                                                  or not self.attention_module):
            raise ConfigError(f"AdaptionPromptConfig.attention_module: expected the attention modules' name "
                              f"(e.g. 'self_attn'), got {self.attention_module!r}")

    def resolved_fields(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        """Pick the top `adapter_layers` attention modules of a Llama-style model."""
        kind = _model_type(model)
        if kind not in ATTENTION_NAMES:
            raise TargetError(f"AdaptionPromptConfig: model type {kind!r} is not supported; supported: "
                              f"{sorted(ATTENTION_NAMES)}")
        if len(targets) != 1:
            raise TargetError(f"AdaptionPromptConfig: the adapter sits at the model's one token embedding, but the "
                              f"targets matched {[p for p, _ in targets]}")
        name = self.attention_module or ATTENTION_NAMES[kind]
        modules = dict(logical_modules(model))  # sites of other adapters stand for their base layers
        found = [(p, m) for p, m in modules.items() if p.endswith("." + name)]
        if len(found) < self.adapter_layers:
            raise TargetError(f"AdaptionPromptConfig.adapter_layers: expected at most the model's {len(found)} "
                              f"'{name}' modules, got {self.adapter_layers}")
        chosen = found[-self.adapter_layers:]  # layers come in order: the top L
        needs = ("c_attn",) if kind == "gpt2" else ("q_proj", "k_proj", "v_proj", "o_proj")
        for path, _ in chosen:
            if not all(f"{path}.{p}" in modules for p in needs):
                raise TargetError(f"AdaptionPromptConfig: '{path}' lacks the projections {list(needs)}")
        # GPT-2's prompt output skips c_proj; o_proj's bias is added even with a zero gate (as in PEFT).
        bias = kind != "gpt2" and any(modules[f"{p}.o_proj"].bias is not None for p, _ in chosen)
        return {"attention_module": name, "layer_paths": [p for p, _ in chosen], "projection_bias": bias}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _INTERNAL:
            out.pop(key, None)
        return out

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"adapter_len": 3, "adapter_layers": 1}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def adapter_output(attn: nn.Module, prompt: torch.Tensor, gate: torch.Tensor, hidden: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """o_proj(gate * softmax(q k^T / sqrt(d)) v) for one Llama-style attention module (PEFT's computation)."""
    batch, length = hidden.shape[:2]
    head_dim, cfg = attn.head_dim, attn.config  # (the projections may be sites of other adapters)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    n = prompt.shape[1]
    key = attn.k_proj(prompt).view(1, n, kv_heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
    value = attn.v_proj(prompt).view(1, n, kv_heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    value = value.repeat_interleave(heads // kv_heads, dim=1)
    query = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    query = query * cos + _rotate_half(query) * sin
    dtype = query.dtype
    scores = query @ key.transpose(2, 3).to(dtype) / math.sqrt(head_dim)
    scores = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = (scores @ value).transpose(1, 2).reshape(batch, length, -1)
    return attn.o_proj(out)


def gpt2_adapter_output(attn: nn.Module, prompt: torch.Tensor, gate: torch.Tensor, hidden: torch.Tensor
                        ) -> torch.Tensor:
    """gate * softmax(q k^T / sqrt(d)) v for a GPT-2 attention module, with no output projection (as PEFT)."""
    batch, length = hidden.shape[:2]
    heads, head_dim, n = attn.num_heads, attn.head_dim, prompt.shape[1]
    _, key, value = attn.c_attn(prompt).split(attn.split_size, dim=2)
    key = key.view(1, n, heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
    value = value.view(1, n, heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
    query = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
    query = query.view(batch, length, heads, head_dim).transpose(1, 2)
    dtype = query.dtype
    scores = query @ key.transpose(2, 3).to(dtype) / math.sqrt(head_dim)
    scores = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return (scores @ value).transpose(1, 2).reshape(batch, length, -1)


class AdaptionPromptDelta(Delta):
    """The prompts and gates of every adapted layer; hooks them into the attention modules for each call."""

    model_input = True
    state_at_root = True
    identity_at_init = True  # the gates start at zero (unless o_proj has a bias, see __init__)

    def __init__(self, base: nn.Embedding, config: AdaptionPromptConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not config.layer_paths:
            raise TargetError("AdaptionPromptConfig: no attention layers were resolved (adapt a model with "
                              "up.adapt so the config is resolved against it)")
        self.layer_paths = list(config.layer_paths)
        hidden = base.embedding_dim
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(1, config.adapter_len, hidden).normal_()) for _ in self.layer_paths])
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in self.layer_paths])
        # PEFT adds o_proj(0) = its bias even with a zero gate: then the adapter is not the identity at init.
        self.identity_at_init = not config.projection_bias
        object.__setattr__(self, "_handles", [])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out  # acts in the attention modules (prepare_inputs)

    # ---- on-disk names: PEFT's per-layer keys -------------------------------------------------
    def _file_keys(self) -> list[tuple[str, str]]:
        prefix = AdapterConfig.state_prefix
        return [(f"{prefix}{p}.adaption_prompt", f"{prefix}{p}.adaption_gate") for p in self.layer_paths]

    def export_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for (pk, gk), prompt, gate in zip(self._file_keys(), self.prompts, self.gates):
            out[pk], out[gk] = prompt, gate
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for (pk, gk), prompt, gate in zip(self._file_keys(), self.prompts, self.gates):
                if pk in tensors:
                    prompt.copy_(tensors[pk].to(prompt.dtype))
                if gk in tensors:
                    gate.copy_(tensors[gk].to(gate.dtype))

    # ---- the per-call hooks ---------------------------------------------------------------------
    def _release(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            prompt = self.prompts[index].to(hidden.dtype)
            if getattr(module, "c_attn", None) is not None:  # GPT-2
                if kwargs.get("encoder_hidden_states") is not None:
                    raise ConfigError("adaption prompt: cross-attention (encoder_hidden_states) is not supported")
                extra = gpt2_adapter_output(module, prompt, self.gates[index], hidden)
            else:
                rope = kwargs.get("position_embeddings")
                if rope is None:
                    raise ConfigError(f"adaption prompt at '{self.layer_paths[index]}': the attention call has "
                                      f"no position_embeddings (a Llama-style model passes them)")
                extra = adapter_output(module, prompt, self.gates[index], hidden, rope)
            if isinstance(output, tuple):
                return (output[0] + extra.to(output[0].dtype), *output[1:])
            return output + extra.to(output.dtype)
        return hook

    def prepare_inputs(self, model, kwargs: dict):
        base = model.base_model
        if base.training and layers.activation_checkpointing(base):
            raise ConfigError("adaption prompt: gradient checkpointing recomputes the attention layers after the "
                              "call, without the adapter; disable it (model.gradient_checkpointing_disable())")
        self._release()  # hooks left by an earlier call
        for index, path in enumerate(self.layer_paths):
            attn = base.get_submodule(path)
            self._handles.append(attn.register_forward_hook(self._layer_hook(index), with_kwargs=True))
        # One model call (or one generation step): the hooks go when it returns or raises.
        self._handles.append(base.register_forward_hook(self._release, always_call=True))
        return kwargs, None


register("adaption_prompt", AdaptionPromptConfig, AdaptionPromptDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True),
         default_targets=is_decoder_embedding)
