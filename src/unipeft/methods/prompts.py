"""Input-side prompt methods: prompt tuning and P-tuning (virtual tokens prepended to the input embeddings).

A prompt adapter lives at the model's input embedding site (where its parameters are found by
set_adapter, saving and the invariant suite) but acts at the model level: the embedding site
passes its output through unchanged, and `prepare_inputs` rewrites the forward's keyword
inputs (embeds the ids, prepends the virtual tokens, extends the attention mask, token type
ids and token labels). Token-level logits are returned for the input positions only, so
`out.logits` lines up with `input_ids` (PEFT's equals `logits[:, num_virtual_tokens:]`).

With a filled `past_key_values` (generation after the first step) the cache already holds the
virtual tokens: only the new tokens are embedded and the attention mask, which covers the real
tokens only, is extended by the virtual positions.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import AdapterLoadError, ConfigError, TargetError
from ..core.fields import choice, fraction, positive_int
from ..core.registry import Capabilities, register

# Names under which models keep their input token embedding (BERT, GPT-2, Llama, GPT-NeoX, T5).
INPUT_EMBEDDINGS = ("word_embeddings", "wte", "embed_tokens", "embed_in", "shared")
_PROMPT_TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def is_input_embedding(path: str, module: nn.Module) -> bool:
    """Default target of prompt methods: an nn.Embedding named like a model's token embedding."""
    return isinstance(module, nn.Embedding) and path.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def _first(data: dict[str, Any], *keys: str):
    return next((data[k] for k in keys if data.get(k) is not None), None)


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by the prompt methods (PEFT's PromptLearningConfig); model sizes are read at adapt time."""

    state_prefix: ClassVar[str] = "base_model."
    not_in_peft = _PROMPT_TARGET_FIELDS
    peft_inert = {"num_transformer_submodules": 1}

    num_virtual_tokens: int = positive_int(8)
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None

    def resolved_fields(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, Any]:
        """Check there is one input embedding and read token_dim / num_layers / heads from the model."""
        if len(targets) != 1:
            raise TargetError(f"{type(self).__name__}: a prompt adapter sits at the model's one input embedding, "
                              f"but the targets matched {[p for p, _ in targets]}; set target_modules to the "
                              f"token embedding's name (e.g. ['word_embeddings'])")
        data = _model_config(model)
        return {"token_dim": self.token_dim or targets[0][1].embedding_dim,
                "num_layers": self.num_layers or _first(data, "num_hidden_layers", "num_layers", "n_layer"),
                "num_attention_heads": self.num_attention_heads or _first(data, "num_attention_heads", "n_head",
                                                                          "num_heads")}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.setdefault("num_transformer_submodules", 1)  # PEFT requires it for decoder/encoder-only models
        return out


class PromptDelta(Delta):
    """Base of the prompt deltas: identity at the embedding site, virtual tokens at the model level."""

    model_input = True
    state_at_root = True
    identity_at_init = False  # virtual tokens change the output by design

    def __init__(self, base: nn.Module, config: PromptLearningConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = config.token_dim or base.embedding_dim

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out  # acts in prepare_inputs; the embedding itself is unchanged

    def prompt(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        """The (num_virtual_tokens, token_dim) virtual token embeddings."""
        raise NotImplementedError

    def update_embeds(self, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Hook for changes to the input token embeddings themselves (DePT); `start`: the real position
        of the first one (non-zero when a cache holds the earlier tokens)."""
        return embeds

    def embed_inputs(self, model, kwargs: dict, start: int = 0) -> torch.Tensor:
        """The input embeddings (through the embedding site, so other adapters there still apply)."""
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise ConfigError("a prompt adapter needs input_ids= or inputs_embeds= in the model call")
            embeds = model.base_model.get_submodule(self.path)(ids)
        return self.update_embeds(embeds, start)

    def continue_inputs(self, model, kwargs: dict, past: int):
        """A call on a cache of `past` positions whose first n are this adapter's virtual tokens."""
        n = self.num_virtual_tokens
        if past < n:
            raise ConfigError(f"prompt adapter at '{self.path}': past_key_values holds {past} positions, fewer than "
                              f"its {n} virtual tokens; pass a cache made by an earlier call through this adapter")
        embeds = self.embed_inputs(model, kwargs, past - n)
        kwargs["inputs_embeds"] = embeds
        extend_cached_mask(kwargs, embeds.shape[0], n, past, embeds.shape[1])
        kwargs["position_ids"] = None  # positions follow the cache, as without one
        return kwargs, None

    def batch_prompts(self, batch: int, device) -> torch.Tensor:
        """(batch, n, d): the virtual tokens put before each row (the same prompt for every row here)."""
        return self.prompt().unsqueeze(0).expand(batch, -1, -1)

    def prepare_inputs(self, model, kwargs: dict):
        past = cache_length(kwargs.get("past_key_values"))
        if past:
            return self.continue_inputs(model, kwargs, past)
        embeds = self.embed_inputs(model, kwargs)
        batch, length = embeds.shape[:2]
        n = self.num_virtual_tokens
        prompts = self.batch_prompts(batch, embeds.device).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        extend_masks(kwargs, batch, n)
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored while a prompt adapter is active (as in PEFT)", stacklevel=4)
            kwargs["position_ids"] = None
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token labels
            kwargs["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
        return kwargs, lambda out: strip_virtual_positions(out, n, n + length)


def extend_masks(kwargs: dict, batch: int, n: int, token_types: bool = True) -> None:
    """Prepend n attended positions to attention_mask (and n zeros to token_type_ids)."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat((mask.new_ones(batch, n), mask), dim=1)
    types = kwargs.get("token_type_ids")
    if token_types and types is not None:
        kwargs["token_type_ids"] = torch.cat((types.new_zeros(batch, n), types), dim=1)


def cache_length(cache) -> int:
    """Positions held by a past_key_values cache (0: none or an empty one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def extend_cached_mask(kwargs: dict, batch: int, n: int, past: int, new: int) -> None:
    """With a cache of `past` positions (n virtual): check the real-token 2-D mask and prepend n ones."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return
    if mask.shape[1] != past - n + new:
        raise ConfigError(f"attention_mask covers {mask.shape[1]} positions; with a cache of {past} positions "
                          f"({n} of them virtual tokens) and {new} new tokens it must cover the {past - n + new} "
                          f"real ones")
    kwargs["attention_mask"] = torch.cat((mask.new_ones(batch, n), mask), dim=1)


def strip_virtual_positions(out, n: int, total: int):
    """Drop the virtual positions from token-level outputs (logits of shape (batch, n + T, ...))."""
    if torch.is_tensor(out):
        return out[:, n:] if out.dim() >= 3 and out.shape[1] == total else out
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits) and logits.dim() >= 3 and logits.shape[1] == total:
        out["logits"] = logits[:, n:]
    return out


# ---- prompt tuning ------------------------------------------------------------------------
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.): `num_virtual_tokens` trainable embeddings prepended to the input.

    init: "random" (N(0, 1), PEFT's default), "vocab" (rows of random vocabulary embeddings) or
    "text" (the embeddings of `init_text`'s tokens, repeated to length; needs the local
    tokenizer folder `tokenizer_name_or_path`).
    """

    peft_class = "PromptTuningConfig"
    peft_type = "PROMPT_TUNING"
    peft_names = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"}
    peft_inert = {"num_transformer_submodules": 1, "tokenizer_kwargs": None}

    init: str = choice("random", sorted(_INITS))
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.init == "text" and not (self.init_text and self.tokenizer_name_or_path):
            raise ConfigError("PromptTuningConfig: init='text' needs init_text and tokenizer_name_or_path "
                              "(a local tokenizer folder)")

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        return _INITS[value] if name == "init" else value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        if name == "init":
            reverse = {v: k for k, v in _INITS.items()}
            if value not in reverse:
                raise ConfigError(f"PromptTuningConfig: prompt_tuning_init={value!r} is not supported; "
                                  f"supported: {sorted(reverse)}")
            return reverse[value]
        return value


def text_token_ids(text: str, tokenizer_path: str, n: int) -> torch.Tensor:
    """`text`'s token ids (no special tokens) repeated and cut to n, as PEFT's TEXT init does."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_path)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"PromptTuningConfig.init_text={text!r} has no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    return torch.tensor(ids, dtype=torch.long)


def init_prompt(weight: torch.Tensor, base: nn.Embedding, init: str, text: str | None, tokenizer: str | None):
    """Fill `weight` (n x d) in place by `init` from the frozen embedding `base`."""
    n = weight.shape[0]
    with torch.no_grad():
        if init == "random":
            nn.init.normal_(weight)
            return
        if init == "vocab":
            ids = torch.randint(0, base.num_embeddings, (n,))
        else:
            ids = text_token_ids(text, tokenizer, n)
            if int(ids.max()) >= base.num_embeddings:
                raise ConfigError(f"PromptTuningConfig.init_text: token id {int(ids.max())} is outside the "
                                  f"embedding's vocabulary ({base.num_embeddings}); use the model's own tokenizer")
        weight.copy_(base.weight[ids.to(base.weight.device)].to(weight.dtype))


class PromptTuningDelta(PromptDelta):
    """The prompt is one (n x d) parameter, saved as PEFT's `prompt_embeddings`."""

    def __init__(self, base: nn.Embedding, config: PromptTuningConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.prompt_embeddings = nn.Parameter(torch.empty(self.num_virtual_tokens, self.token_dim))
        if config.inference_mode:  # about to be loaded: PEFT skips the init too
            nn.init.zeros_(self.prompt_embeddings)
        else:
            init_prompt(self.prompt_embeddings, base, config.init, config.init_text, config.tokenizer_name_or_path)

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings


# ---- P-tuning -----------------------------------------------------------------------------
@dataclass
class PTuningConfig(PromptLearningConfig):
    """P-tuning (Liu et al.): virtual tokens produced by a prompt encoder (MLP or bidirectional LSTM)."""

    peft_class = "PromptEncoderConfig"
    peft_type = "P_TUNING"
    peft_names = {"encoder": "encoder_reparameterization_type"}

    encoder: str = choice("MLP", ("MLP", "LSTM"))
    encoder_hidden_size: int | None = positive_int(None, optional=True)
    encoder_num_layers: int = positive_int(2)
    encoder_dropout: float = fraction(0.0, "0 <= dropout < 1")

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        out = super().resolved_fields(model, targets)
        return {**out, "encoder_hidden_size": self.encoder_hidden_size or out["token_dim"]}


class ReparametrizedPrompt(PromptDelta):
    """A prompt computed by a trainable encoder. Saved as PEFT does (the computed `prompt_embeddings`)
    plus the encoder's own tensors; a file holding only `prompt_embeddings` (PEFT's) loads as a fixed
    prompt for inference."""

    encoder_prefix: ClassVar[str] = "prompt_encoder."

    def __init__(self, base, config, path, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.register_buffer("fixed_prompt", None, persistent=False)

    def encode(self) -> torch.Tensor:  # pragma: no cover - subclasses define it
        """The prompt computed by the encoder."""
        raise NotImplementedError

    def prompt(self) -> torch.Tensor:
        return self.fixed_prompt if self.fixed_prompt is not None else self.encode()

    def export_state(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeddings": self.prompt().detach()}
        out.update({self.encoder_prefix + k: v for k, v in self.state_dict().items()})
        return out

    def optional_state(self, suffix: str) -> bool:
        return suffix.startswith(self.encoder_prefix)

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in tensors.items() if k.startswith(self.encoder_prefix)}
        if not own:  # PEFT's file: the final prompt only
            self.fixed_prompt = tensors["prompt_embeddings"].detach().clone()
            return
        missing = sorted(set(self.state_dict()) - {k[len(self.encoder_prefix):] for k in own})
        if missing:
            raise AdapterLoadError(f"prompt encoder at '{self.path}': the file has some encoder tensors but lacks "
                                   f"{missing}")
        self.fixed_prompt = None
        self.load_state_dict({k[len(self.encoder_prefix):]: v for k, v in own.items()})


class PTuningDelta(ReparametrizedPrompt):
    """PEFT's PromptEncoder: embedding -> MLP (3 layers, ReLU) or bidirectional LSTM + MLP head."""

    def __init__(self, base: nn.Embedding, config: PTuningConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d, h = self.token_dim, config.encoder_hidden_size or self.token_dim
        self.embedding = nn.Embedding(self.num_virtual_tokens, d)
        self.use_lstm = config.encoder == "LSTM"
        if self.use_lstm:
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def encode(self) -> torch.Tensor:
        h = self.embedding.weight
        if self.use_lstm:
            h = self.lstm_head(h.unsqueeze(0))[0][0]
        return self.mlp_head(h)


_CAPS = Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True,
                     quantized_base=True)
register("prompt_tuning", PromptTuningConfig, PromptTuningDelta, _CAPS, default_targets=is_input_embedding)
register("p_tuning", PTuningConfig, PTuningDelta, _CAPS, default_targets=is_input_embedding)
