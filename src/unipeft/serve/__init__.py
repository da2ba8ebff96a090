"""Multi-adapter serving: a continuous-batching engine (engine.py) over an AdaptedModel, one adapter per
request, with per-sequence KV caches (kv.py)."""
from .engine import Engine, GenRequest, TokenEvent

__all__ = ["Engine", "GenRequest", "TokenEvent"]
