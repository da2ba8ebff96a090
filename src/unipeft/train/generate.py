"""Text generation with a causal LM, plain or adapted: transformers' generate with the KV cache.

An AdaptedModel's own `generate` (core/generation.py) prepares every step as its forward would:
input-side adapters (soft prompts, P-tuning, prefixes, DePT) act at the first step and continue on
the cache afterwards; site adapters (LoRA, ...) sit in the base model's modules anyway.
`generate` encodes prompts the way training encodes them, checks that they fit the context, and
streams the completions through a callback, cut at the first stop string (never emitted, not even
in part).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError


def context_length(model: nn.Module) -> int | None:
    """The model's position limit (max_position_embeddings / n_positions), None if it has none."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _input_deltas(model: nn.Module) -> list:
    return model._input_deltas() if hasattr(model, "_input_deltas") else []


def model_name(model: nn.Module, tokenizer: Any = None) -> str:
    """A name for messages: the tokenizer's or the config's name_or_path, else the class name."""
    for obj in (tokenizer, getattr(model, "config", None)):
        name = getattr(obj, "name_or_path", None) or getattr(obj, "_name_or_path", None)
        if name:
            return str(name)
    return type(model).__name__


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False, name: str = "") -> list[list[int]]:
    """Token ids of each prompt as training encodes it: [bos] prompt, or (chat) the chat template's
    user turn with the assistant's start (the template brings its own special tokens)."""
    from ..data.encode import encode_prompt_completion

    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"chat (--chat): the tokenizer of model {name or model_name(None, tokenizer)!r} has no chat "
                          f"template; drop --chat or use a chat model (e.g. --base smollm2)")
    return [encode_prompt_completion(tokenizer, p, None, 10 ** 9, chat)[0] for p in prompts]


def check_lengths(model: nn.Module, ids: Sequence[Sequence[int]], max_new_tokens: int, name: str = "") -> None:
    """Refuse (before generating anything) a prompt that does not fit the context with max_new_tokens."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = context_length(model)
    deltas = _input_deltas(model)
    virtual = sum(int(getattr(d, "num_virtual_tokens", 0)) for d in deltas)
    name = name or model_name(model)
    for i, row in enumerate(ids, 1):
        if limit is not None and len(row) + max_new_tokens + virtual > limit:
            extra = f" + {virtual} virtual tokens of the adapter" if virtual else ""
            raise ConfigError(f"prompt {i} has {len(row)} tokens, but model {name!r} has a context of {limit} "
                              f"positions (max_position_embeddings) and {len(row)} + {max_new_tokens} new tokens"
                              f"{extra} = {len(row) + max_new_tokens + virtual} > {limit}: at most "
                              f"{max(0, limit - max_new_tokens - virtual)} prompt tokens fit; shorten the prompt "
                              f"or lower max-new-tokens")
        for d in deltas:
            cap = getattr(d, "max_length", None)  # DePT updates the embeddings of the first max_length tokens
            if isinstance(cap, int) and len(row) + max_new_tokens > cap:
                raise ConfigError(f"prompt {i} has {len(row)} tokens; with {max_new_tokens} new tokens that is "
                                  f"{len(row) + max_new_tokens}, more than the DePT adapter's max_length {cap}")


class TextStream:
    """Incremental text of the generated tokens: emits what can no longer turn into a stop string and
    marks the stream done at the first stop string (cut off, never emitted)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text, self.emitted, self.done = "", 0, False

    def update(self, tokens: Sequence[int], final: bool = False) -> bool:
        """Take the generated tokens so far; return True once a stop string was reached."""
        if self.done:
            return True
        self.tokens = list(tokens)
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (decoded.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done, final, decoded = True, True, decoded[:cut]
        self.text = decoded
        safe = len(decoded) if final else self._safe_end(decoded)
        if safe > self.emitted:
            chunk, self.emitted = decoded[self.emitted:safe], safe
            if self.on_text is not None:
                self.on_text(chunk)
        return self.done

    def _safe_end(self, text: str) -> int:
        """Where text stops being certain: before a partial character or a tail that may begin a stop string."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), hold, -1):
                if text[end - k:end] == s[:k]:
                    hold = k
                    break
        return end - hold


def _stopping(stream: TextStream, start: int):
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        """Feeds each step's new tokens to the stream (transformers calls this after every token)."""

        def __call__(self, input_ids, scores, **_):
            done = stream.update(input_ids[0, start:].tolist())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return _Stop()


@dataclass
class GenerationOptions:
    """Decoding settings: temperature 0 is greedy; top_p / top_k apply when sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    chat: bool = False
    use_cache: bool = True

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers' generate arguments for these settings."""
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "use_cache": self.use_cache}
        if self.temperature == 0:
            return {**out, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**out, "do_sample": True, "temperature": float(self.temperature),
                "top_p": 1.0 if self.top_p is None else float(self.top_p), "top_k": int(self.top_k or 0)}


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's generation config's and the one training appends."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    ids += value if isinstance(value, list) else ([value] if value is not None else [])
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.append(int(value))
            break
    return list(dict.fromkeys(int(i) for i in ids))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], options: GenerationOptions | None = None,
             on_text: Callable[[int, str], None] | None = None, on_end: Callable[[int, str], None] | None = None,
             name: str = "", **overrides: Any) -> list[str]:
    """The completion of each prompt (one at a time, KV cache on). `on_text(i, chunk)` receives the
    text of prompt i as it is generated, `on_end(i, text)` its whole completion; `overrides` set
    GenerationOptions fields. Every prompt is checked against the context before anything is generated."""
    opts = options or GenerationOptions()
    if overrides:
        opts = GenerationOptions(**{**opts.__dict__, **overrides})
    kwargs = opts.generate_kwargs()
    name = name or model_name(model, tokenizer)
    ids = encode_prompts(tokenizer, prompts, opts.chat, name)
    check_lengths(model, ids, opts.max_new_tokens, name)
    was_training = model.training
    model.eval()
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    device = next(model.parameters()).device
    outs = []
    try:
        for i, row in enumerate(ids):
            emit = None if on_text is None else (lambda chunk, i=i: on_text(i, chunk))
            stream = TextStream(tokenizer, opts.stop, emit)
            x = torch.tensor([row], device=device)
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 stopping_criteria=[_stopping(stream, x.shape[1])], pad_token_id=pad,
                                 eos_token_id=eos or None, **kwargs)
            new = gen[0, x.shape[1]:].tolist()
            stream.update([t for t in new if t not in eos] if not stream.done else stream.tokens, final=True)
            outs.append(stream.text)
            if on_end is not None:
                on_end(i, stream.text)
    finally:
        model.train(was_training)
    return outs


def load_for_generation(source: str, base: str | None = None) -> tuple[nn.Module, Any, str, bool]:
    """(model, tokenizer, base model name, chat by default) from a finished causal_lm run folder or an
    adapter folder; `base` (a local folder or a built-in name) supplies or replaces the base model."""
    import json
    from pathlib import Path

    import yaml

    from ..core.model import AdaptedModel
    from .artifacts import load_run
    from .config import ModelConfig
    from .models import load_base_model, load_tokenizer, model_path
    from .run import SUMMARY
    from .strategy import ADAPTER_DIR

    src = Path(source)
    chat = False
    if (src / SUMMARY).is_file() or (src / "config.yaml").is_file():
        if base is None:
            run = load_run(src)
            if run.cfg.task != "causal_lm":
                raise ConfigError(f"{src} is a {run.cfg.task} run; unipeft generate needs a task: causal_lm run "
                                  f"(use unipeft predict for labels)")
            return run.model, run.tokenizer, run.cfg.model.name, bool(run.cfg.data.chat_template)
        saved = yaml.safe_load((src / "config.yaml").read_text()) if (src / "config.yaml").is_file() else {}
        chat = bool((saved.get("data") or {}).get("chat_template", False))
        if not (src / ADAPTER_DIR / "adapter_config.json").is_file():
            raise ConfigError(f"--base: run {src} has no {ADAPTER_DIR}/adapter_config.json (a 'full' run keeps its "
                              f"own weights); drop --base")
        src = src / ADAPTER_DIR
    if not (src / "adapter_config.json").is_file():
        raise ConfigError(f"{source} is neither a finished unipeft run folder (summary.json, config.yaml) nor an "
                          f"adapter folder (adapter_config.json)")
    name = base or json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise ConfigError(f"{src / 'adapter_config.json'} names no base model (base_model_name_or_path is empty); "
                          f"pass --base PATH_OR_BUILTIN, e.g. --base smollm2")
    model_path(name)  # a clear error for an unknown name before anything loads
    tokenizer = load_tokenizer(name)
    model = AdaptedModel.from_pretrained(load_base_model(ModelConfig(name=name), "causal_lm", [], 0), src)
    return model.eval(), tokenizer, name, chat
