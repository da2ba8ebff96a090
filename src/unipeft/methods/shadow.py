"""ShadowPEFT: a small trainable parallel "shadow" network riding a frozen decoder-only model.

A shadow backbone (by default a 1-layer mirror of the base decoder stack, fed the base's frozen input
embeddings) turns the model inputs into an initial shadow state s0 (projected to the base width when its
width differs). At every adapted decoder block l, with h the block's input (the previous block's output):

  s_{l-1} = (1 - g) * s_{l-2} + g * t,  t = T_{l-1}(h), g = sigmoid(G_{l-1}(h))    (the previous block's update)
  block input = h + alpha * W_up(Dropout(W_down(h - s_{l-1})))                    (injection)

so the shadow state advances block by block with the base's hidden states. The blocks must be consecutive
entries of one ModuleList (the state rides the decoder loop from the first to the last). W_up starts at zero:
a fresh adapter is the identity. With labels and task_type "CAUSAL_LM", the shadow path's own loss
CE(lm_head(s0), labels) is added with weight auxiliary_loss_weight (its detached value is `out.shadow_loss`).

How it sits on core: the backbone and projection are the adapter's bank (saved under PEFT's
`base_model.shadow_backbone.default.*` keys); each adapted block is a site with an input-side delta (its
W_down, W_up, T, G, saved as PEFT's `shadow_down.default.weight`, ...); the first block's delta is also a
model-level input delta whose `prepare_inputs` runs the backbone on the call's inputs and opens the call's
shadow state, which the blocks then advance in order. Cached generation keeps the backbone's own cache in
the bank, step by step, as PEFT's paired cache does. Not mergeable (the adaptation is input-dependent), no
mixed batches, one active shadow adapter at a time, shadow_model "mirror" only (nothing is downloaded), no
SEQ_CLS shadow head. transformers' gradient checkpointing re-runs only a block's own forward, so the injection
(outside it) runs once per call; blocks running out of order would be refused. A listed target_modules entry
must name a decoder block.
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..core.bank import Bank
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, TargetError
from ..core.fields import Rule, choice, fraction, non_negative, positive_int, ruled
from ..core.registry import Capabilities, register
from ..core.site import AdaptedSite
from ..core.targets import logical_modules, name_matches

_BLOCK = re.compile(r"(^|\.)(layers|h)\.\d+$")  # decoder blocks: entries of a `layers` / `h` ModuleList
# transformers' base class of its decoder (and encoder) blocks: the only modules a shadow site wraps.
BLOCK_TYPES = (GradientCheckpointingLayer,)


def _optional_positive() -> Any:
    return positive_int(None, optional=True)


@dataclass
class ShadowConfig(AdapterConfig):
    """ShadowPEFT (PEFT's ShadowConfig): target_modules are whole decoder blocks (default: all of them);
    r is the injection rank, update_hidden_size the width of the update MLPs (default r)."""

    peft_class = "ShadowConfig"
    peft_type = "SHADOW"

    r: int = positive_int(8)
    shadow_alpha: float = ruled(0.1, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                          "a number"))
    shadow_dropout: float = fraction(0.2, "0 <= shadow_dropout < 1")
    init_weights: bool = True
    shadow_model: str = choice("mirror", ["mirror"])
    shadow_num_hidden_layers: int | None = _optional_positive()
    shadow_hidden_size: int | None = _optional_positive()
    shadow_num_attention_heads: int | None = _optional_positive()
    shadow_intermediate_size: int | None = _optional_positive()
    share_embeddings: bool = True
    update_hidden_size: int | None = _optional_positive()
    auxiliary_loss_weight: float = non_negative(0.05)

    def validate(self) -> None:
        """The field rules and PEFT's checks of how blocks are selected."""
        super().validate()
        name = type(self).__name__
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(f"{name}.layers_to_transform: cannot be combined with a regex target_modules "
                              f"({self.target_modules!r}); list the blocks instead")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}.layers_pattern: needs layers_to_transform, got {self.layers_pattern!r} alone")
        if self.task_type == "SEQ_CLS":
            raise ConfigError(f"{name}.task_type: 'SEQ_CLS' (a copied classifier as shadow head) is not supported "
                              f"here; use 'CAUSAL_LM' or None")

    def resolved_fields(self, model: nn.Module, targets) -> dict[str, Any]:
        """The chosen blocks by name, as PEFT records them when target_modules is None."""
        return {"target_modules": [p for p, _ in targets]} if self.target_modules is None else {}

    def make_bank(self, model: nn.Module, targets) -> "ShadowBank":
        """The mirrored shadow backbone (and its projection) for the consecutive blocks `targets`; every listed
        target_modules entry must name a decoder block (one naming a module inside a block is a mistake)."""
        if isinstance(self.target_modules, list):
            blocks = [p for p, m in logical_modules(model) if isinstance(m, BLOCK_TYPES)]
            stray = [e for e in self.target_modules if not any(name_matches(p, [e]) for p in blocks)]
            if stray:
                raise TargetError(f"ShadowConfig.target_modules: {stray} name no decoder block (ShadowPEFT wraps "
                                  f"whole blocks, e.g. {blocks[:2]})")
        nested = [f"{p}.{q}" for p, block in targets for q, m in block.named_modules() if isinstance(m, AdaptedSite)]
        if nested:
            raise TargetError(f"ShadowConfig: the blocks to wrap already hold adapted modules ({nested[:3]}); core "
                              f"cannot nest a block-level site over other adapters' sites: add ShadowPEFT first, "
                              f"or use a model without those adapters")
        return ShadowBank(model, [p for p, _ in targets], self)


def hidden_size(config: Any) -> int:
    """The model width of a transformers config (hidden_size, n_embd or d_model)."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    raise TargetError(f"ShadowConfig: cannot read the hidden size of {type(config).__name__}")


def _set_first(cfg: Any, names: tuple[str, ...], value: int) -> None:
    for attr in names:
        if hasattr(cfg, attr):
            setattr(cfg, attr, int(value))
            return
    raise TargetError(f"ShadowConfig: the backbone config {type(cfg).__name__} has none of {list(names)} to set "
                      f"for the mirrored shadow backbone")


def mirror_config(cfg: Any, config: ShadowConfig) -> Any:
    """A copy of the backbone's config reduced as the shadow_* fields ask (per-layer lists truncated)."""
    cfg = copy.deepcopy(cfg)
    _set_first(cfg, ("num_hidden_layers", "n_layer", "num_layers"), config.shadow_num_hidden_layers or 1)
    for value, names in ((config.shadow_hidden_size, ("hidden_size", "n_embd", "d_model")),
                         (config.shadow_intermediate_size, ("intermediate_size", "ffn_dim", "n_inner")),
                         (config.shadow_num_attention_heads, ("num_attention_heads", "n_head", "num_heads"))):
        if value is not None:
            _set_first(cfg, names, value)
    n = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        types = list(types) or ["full_attention"]
        cfg.layer_types = (types + [types[-1]] * n)[:n]
    if getattr(cfg, "max_window_layers", None) is not None and int(cfg.max_window_layers) > n:
        cfg.max_window_layers = n
    return cfg


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


class _Run:
    """One model call's shadow state: the seed s0, the state so far and the block that advanced it last."""

    def __init__(self, call: int, seed: torch.Tensor) -> None:
        self.call, self.seed, self.state, self.prev = call, seed, seed, None


class ShadowBank(Bank):
    """`shadow_backbone` (a mirror of the decoder stack) and `shadow_projection` (shadow -> base width)."""

    def __init__(self, model: nn.Module, paths: list[str], config: ShadowConfig) -> None:
        super().__init__()
        parents = {p.rsplit(".", 1)[0] for p in paths}
        lists = [model.get_submodule(p) for p in parents]
        if len(parents) != 1 or not isinstance(lists[0], nn.ModuleList):
            raise TargetError(f"ShadowConfig.target_modules: expected decoder blocks of one ModuleList, got {paths}")
        index = [int(p.rsplit(".", 1)[1]) for p in paths]
        if index != list(range(index[0], index[0] + len(index))):
            raise TargetError(f"ShadowConfig.target_modules: the blocks must be consecutive (the shadow state "
                              f"rides the decoder loop from the first to the last), got {paths}")
        owner_path = next(iter(parents)).rsplit(".", 1)[0] if "." in next(iter(parents)) else ""
        owner = model.get_submodule(owner_path)
        if getattr(owner, "config", None) is None or getattr(model, "config", None) is None:
            raise TargetError(f"ShadowConfig: '{owner_path}' has no transformers config to mirror")
        self.paths, self.hidden_size = paths, hidden_size(model.config)
        backbone = type(owner)(mirror_config(owner.config, config))
        width = hidden_size(backbone.config)
        try:
            params = inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "input_ids" not in params and "inputs_embeds" not in params:
            raise TargetError(f"ShadowConfig: '{owner_path}' ({type(owner).__name__}) does not take input_ids or "
                              f"inputs_embeds, so its mirror cannot seed the shadow state (a decoder-only model's "
                              f"block stack is needed)")
        takes_embeds = "inputs_embeds" in params
        self.share = bool(config.share_embeddings and takes_embeds and width == self.hidden_size)
        if self.share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens  # fed the base's frozen embeddings instead
        projection = nn.Identity() if width == self.hidden_size else nn.Linear(width, self.hidden_size, bias=False)
        ref = next(model.parameters())
        self.shadow_backbone = backbone.to(device=ref.device, dtype=ref.dtype)
        self.shadow_projection = projection.to(device=ref.device, dtype=ref.dtype)
        self.train(model.training)  # a new module trains by default; the base may be in eval mode (dropout)
        object.__setattr__(self, "run", None)  # the current call's _Run (plain attributes, not state)
        object.__setattr__(self, "cache", None)  # the backbone's cache across generation steps

    def saved_key(self, key: str) -> str:
        """PEFT's file keys: `base_model.shadow_backbone.default.<key>`."""
        top, rest = key.split(".", 1)
        return f"base_model.{top}.default.{rest}"

    def seed(self, model: nn.Module, kwargs: dict) -> torch.Tensor:
        """s0 for the call's inputs, continuing the backbone's own cache when the base continues one."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ConfigError("a ShadowPEFT adapter needs input_ids= or inputs_embeds= in the model call")
        past = _cache_length(kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(model.base_model.config, "use_cache", False))
        if past and (self.cache is None or _cache_length(self.cache) != past):
            raise ConfigError(f"ShadowPEFT: past_key_values holds {past} positions but the shadow backbone's cache "
                              f"does not continue it; continue a cache made by the previous call through this model")
        if not past:
            from transformers import DynamicCache
            object.__setattr__(self, "cache", DynamicCache() if use_cache else None)
        if self.share and embeds is None:
            embeds = model.base_model.get_input_embeddings()(ids)
        extra = {k: kwargs[k] for k in ("attention_mask", "position_ids") if kwargs.get(k) is not None}
        main = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
        out = self.shadow_backbone(**main, **extra, past_key_values=self.cache, use_cache=bool(use_cache),
                                   return_dict=True)
        return self.shadow_projection(out.last_hidden_state)


class ShadowDelta(Delta):
    """One decoder block's injection (`shadow_down`, `shadow_up`) and state update (`shadow_update_transform`,
    `shadow_update_gate`); the first block's delta also seeds the call's shadow state (model-level input)."""

    kind = "input"

    def __init__(self, base: nn.Module, config: ShadowConfig, path: str, bank: ShadowBank | None = None) -> None:
        super().__init__(base, config, path, bank)
        d, r = bank.hidden_size, config.r
        width = config.update_hidden_size or r
        self.index = bank.paths.index(path)
        self.model_input = self.index == 0
        self.alpha = float(config.shadow_alpha)
        self.aux_weight = float(config.auxiliary_loss_weight)
        self.lm_head_loss = config.task_type == "CAUSAL_LM"
        self.shadow_down = nn.Linear(d, r, bias=False)
        self.shadow_up = nn.Linear(r, d, bias=False)
        self.shadow_dropout = nn.Dropout(config.shadow_dropout) if config.shadow_dropout else nn.Identity()
        if config.init_weights:
            nn.init.zeros_(self.shadow_up.weight)
        self.shadow_update_transform = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.shadow_update_gate = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.identity_at_init = bool(config.init_weights)
        self.train(base.training)  # dropout follows the model's mode, as the block's own modules do

    def saved_key(self, key: str) -> str:
        """PEFT keeps the adapter-name slot as `default`: `shadow_down.default.weight`."""
        top, rest = key.split(".", 1)
        return f"{top}.default.{rest}"

    def inject(self, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        """h + alpha * W_up(Dropout(W_down(h - s)))."""
        dtype = self.shadow_down.weight.dtype
        delta = self.shadow_up(self.shadow_down(self.shadow_dropout((hidden - shadow).to(dtype))))
        return hidden + (self.alpha * delta).to(hidden.dtype)

    def advance(self, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        """(1 - g) * s + g * T(h), g = sigmoid(G(h)): the state after this block, from its output `hidden`."""
        dtype = self.shadow_update_transform[0].weight.dtype
        h = hidden.to(dtype)
        gate = torch.sigmoid(self.shadow_update_gate(h))
        return ((1.0 - gate) * shadow.to(dtype) + gate * self.shadow_update_transform(h)).to(shadow.dtype)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        run = self.bank.run
        if run is None or self._ctx is None or run.call != self._ctx.calls:
            return x  # the block ran outside a call of the adapted model: no shadow state to inject
        if self.index == 0:
            if x.shape[:-1] != run.seed.shape[:-1]:
                raise ValueError(f"ShadowPEFT at '{self.path}': shadow state of shape {tuple(run.seed.shape[:-1])} "
                                 f"but hidden states of shape {tuple(x.shape[:-1])}")
            shadow = run.seed
        else:
            prev = run.prev
            if prev is None or prev.index != self.index - 1:
                raise ConfigError(f"ShadowPEFT at '{self.path}': the adapted blocks ran out of order (gradient "
                                  f"checkpointing of adapted blocks is not supported)")
            shadow = prev.advance(x, run.state)
        run.state, run.prev = shadow, self
        return self.inject(x, shadow)

    def prepare_inputs(self, model, kwargs: dict):
        mine = [n for n in model.active_adapters if isinstance(model.peft_config[n], ShadowConfig)]
        if len(mine) > 1:
            raise ConfigError(f"ShadowPEFT needs exactly one active shadow adapter, got {mine}")
        bank = self.bank
        run = _Run(self._ctx.calls, bank.seed(model, kwargs))
        object.__setattr__(bank, "run", run)
        labels = kwargs.get("labels")

        def finish(out):
            object.__setattr__(bank, "run", None)
            if labels is None or getattr(out, "loss", None) is None or not self.lm_head_loss:
                return out
            head = model.base_model.get_output_embeddings()
            logits = head(run.seed)[..., :-1, :]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1),
                                   ignore_index=-100)
            out.shadow_loss = loss.detach()
            if self.aux_weight > 0:
                out.loss = out.loss + self.aux_weight * loss
            return out
        return kwargs, finish


def _decoder_block(path: str, module: nn.Module) -> bool:
    return bool(_BLOCK.search(path)) and isinstance(module, BLOCK_TYPES)


register("shadow", ShadowConfig, ShadowDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=BLOCK_TYPES, peft_compatible=True),
         default_targets=_decoder_block)
