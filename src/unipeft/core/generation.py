"""Generation with adapters: transformers' generate of the base model, the active adapters applied at every step.

Input-level deltas (soft prompts, prefixes, DePT) prepare each step's inputs: generate's
`prepare_inputs_for_generation` is wrapped for the call (as PEFT does) so the first step gets the
virtual tokens / prefix cache and later steps continue that cache.
"""
from __future__ import annotations

import functools
from typing import Any

from .errors import ConfigError


def generate_with_adapters(model: Any, *args: Any, **kwargs: Any):
    """`model.base_model.generate(*args, **kwargs)` under AdaptedModel `model`'s active adapters."""
    base, ctx = model.base_model, model._ctx
    deltas = model._input_deltas()
    if len(deltas) > 1:
        raise ConfigError(f"generation with {len(deltas)} active prompt/prefix adapters at once is not supported; "
                          f"activate one of {model.active_adapters}")
    held = {n: kwargs.pop(n) for n in model._call_input_names() if n in kwargs}
    user_positions = kwargs.get("position_ids") is not None
    own = base.__dict__.get("prepare_inputs_for_generation")
    original = base.prepare_inputs_for_generation

    @functools.wraps(original)  # transformers checks the generate arguments against this signature
    def prepare(*args, **kw):
        inputs = original(*args, **kw)
        ctx.calls += 1  # one model call per step, as AdaptedModel.forward counts them
        if inputs.get("use_cache") is False:  # a prefix cache the model handed back: not a cache to continue
            inputs.pop("past_key_values", None)
        if deltas and not user_positions:  # positions then follow the cache, virtual tokens included
            inputs.pop("position_ids", None)
        for delta in deltas:
            inputs, _ = delta.prepare_inputs(model, dict(inputs))
        return inputs

    base.prepare_inputs_for_generation = prepare
    ctx.inputs = held
    try:
        return base.generate(*args, **kwargs)
    finally:
        ctx.inputs = {}
        if own is None:
            del base.prepare_inputs_for_generation
        else:
            base.prepare_inputs_for_generation = own
