"""A few greedy generations of a finished causal LM run, written beside its metrics (samples.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data.encode import encode_prompt_completion

SAMPLES = "samples.jsonl"


@torch.no_grad()
def write_samples(model: Any, tokenizer: Any, data: Any, cfg: Any, path: Path, count: int = 8,
                  max_new_tokens: int = 48) -> list[dict[str, str]]:
    """Greedy completions of the first `count` prompts of `data` (a PromptCompletions split), KV cache on."""
    rows = []
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    try:
        for prompt, reference in list(zip(data.prompts, data.completions))[:count]:
            ids, _ = encode_prompt_completion(tokenizer, prompt, None, cfg.data.max_length, cfg.data.chat_template)
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            new = out[0, x.shape[1]:].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            rows.append({"prompt": prompt, "reference": reference,
                         "generated": tokenizer.decode(new, skip_special_tokens=True).strip()})
    finally:
        model.train(was_training)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
