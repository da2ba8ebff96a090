"""A few greedy generations of a finished causal LM run, written beside its metrics (samples.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLES = "samples.jsonl"


def write_samples(model: Any, tokenizer: Any, data: Any, cfg: Any, path: Path, count: int = 8,
                  max_new_tokens: int = 48) -> list[dict[str, str]]:
    """Greedy completions (KV cache on) of the first `count` prompts of `data`, a PromptCompletions split."""
    from .generate import generate

    pairs = list(zip(data.prompts, data.completions))[:count]
    texts = generate(model, tokenizer, [p for p, _ in pairs], name=cfg.model.name, max_new_tokens=max_new_tokens,
                     chat=cfg.data.chat_template)
    rows = [{"prompt": p, "reference": r, "generated": t.strip()} for (p, r), t in zip(pairs, texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
