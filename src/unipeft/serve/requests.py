"""What the engine serves: a generation request, the events it streams back, and the request's validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenRequest:
    """One generation request: prompt token ids and sampling settings."""

    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_ids: list[list[int]] = field(default_factory=list)  # token sequences that end the request
    seed: int | None = None  # seeds this request's own torch.Generator (sampling only)
    min_tokens: int = 0  # end-of-sequence is suppressed until this many tokens were generated


@dataclass
class TokenEvent:
    """One streamed event of a request."""

    token_id: int | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" on the final event
    error: str | None = None


def check(req: Any, vocab: int | None) -> str | None:
    """The error message for an invalid request (naming the field), or None."""
    if not isinstance(req, GenRequest):
        return f"expected a GenRequest, got {type(req).__name__}"
    ids = req.prompt_ids
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        return "prompt_ids must be a non-empty list of token ids"
    if vocab is not None and not all(0 <= t < vocab for t in ids):
        return f"prompt_ids: every token id must be in [0, {vocab})"
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        return f"max_tokens must be an integer >= 1, got {req.max_tokens!r}"
    if not isinstance(req.min_tokens, int) or req.min_tokens < 0:
        return f"min_tokens must be an integer >= 0, got {req.min_tokens!r}"
    if not isinstance(req.temperature, (int, float)) or not req.temperature >= 0:
        return f"temperature must be >= 0, got {req.temperature!r}"
    if not isinstance(req.top_p, (int, float)) or not 0 < req.top_p <= 1:
        return f"top_p must be in (0, 1], got {req.top_p!r}"
    if not all(isinstance(s, list) and s and all(isinstance(t, int) for t in s) for s in req.stop_ids):
        return "stop_ids must be a list of non-empty lists of token ids"
    return None
