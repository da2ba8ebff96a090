"""Tokenized examples with per-example loss weights, and a collator that pads each batch to its longest row."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .splits import DataError, LabeledTexts, LabeledVectors, PromptCompletions

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class EncodedSet:
    """Model-ready examples. `weights[i]` is example i's share of the loss denominator:
    1 for a classification example, its number of target tokens for causal LM."""

    rows: list[dict[str, Any]]
    weights: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.rows)


def encode_texts(tokenizer: Any, data: LabeledTexts, max_length: int) -> EncodedSet:
    """Tokenize texts (truncated to `max_length`) with their class labels."""
    ids = tokenizer(list(data.texts), truncation=True, max_length=max_length)["input_ids"]
    rows = [{"input_ids": list(x), "labels": int(y)} for x, y in zip(ids, data.labels)]
    return EncodedSet(rows, [1] * len(rows), [len(x) for x in ids])


def _special(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """`prompt` as one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"data.chat_template: the tokenizer of {name!r} has no chat template; "
                        f"set chat_template: false or use a chat model (e.g. model: smollm2)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str | None, max_length: int,
                             chat: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one pair: [bos] prompt completion [eos], labels IGNORE outside the completion.

    With `chat`, the prompt is rendered through the chat template (which brings its own start
    tokens, so no bos is added) and the eos ends the assistant's turn. With `completion=None`
    (generation) only the prompt part is returned.
    """
    bos = None if chat else _special(tokenizer, "bos_token_id", "cls_token_id")
    eos = _special(tokenizer, "eos_token_id", "sep_token_id")
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    head = ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return head[-max_length:], [IGNORE] * min(len(head), max_length)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    ids = (head + tail)[:max_length]
    labels = ([IGNORE] * len(head) + tail)[:max_length]
    return ids, labels


def encode_prompt_completions(tokenizer: Any, data: PromptCompletions, max_length: int, chat: bool = False
                              ) -> EncodedSet:
    """Tokenize pairs for causal LM; pairs whose completion is cut off entirely are an error."""
    rows, weights, lengths = [], [], []
    for i, (p, c) in enumerate(zip(data.prompts, data.completions)):
        ids, labels = encode_prompt_completion(tokenizer, p, c, max_length, chat)
        weight = sum(1 for y in labels[1:] if y != IGNORE)  # position 0 is never predicted
        if weight == 0:
            raise DataError(f"example {i}: no completion token fits in data.max_length={max_length} "
                            f"(prompt has {len(ids)} tokens); raise max_length or shorten the prompt")
        rows.append({"input_ids": ids, "labels": labels})
        weights.append(weight)
        lengths.append(len(ids))
    return EncodedSet(rows, weights, lengths)


def encode_vectors(data: LabeledVectors) -> EncodedSet:
    """Feature vectors with class labels (no tokenization)."""
    rows = [{"inputs": np.asarray(x, dtype=np.float32), "labels": int(y)} for x, y in zip(data.features, data.labels)]
    return EncodedSet(rows, [1] * len(rows), [1] * len(rows))


def encode_split(tokenizer: Any, data: Any, max_length: int, chat: bool = False) -> EncodedSet:
    """Encode any split type (texts, prompt/completions, vectors); `chat` renders prompts as chat turns."""
    if isinstance(data, LabeledVectors):
        return encode_vectors(data)
    if tokenizer is None:
        raise DataError("this model takes vectors, but the data are texts; use a text model (e.g. model: minilm)")
    if isinstance(data, LabeledTexts):
        return encode_texts(tokenizer, data, max_length)
    if isinstance(data, PromptCompletions):
        return encode_prompt_completions(tokenizer, data, max_length, chat)
    raise DataError(f"cannot encode data of type {type(data).__name__}")


def collate(rows: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack rows into tensors, padding token rows on the right to the batch's longest (dynamic padding)."""
    if "inputs" in rows[0]:
        return {"inputs": torch.from_numpy(np.stack([r["inputs"] for r in rows])),
                "labels": torch.tensor([r["labels"] for r in rows])}
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_labels = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long) if token_labels else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if labels is not None:
            labels[i, :n] = torch.tensor(r["labels"])
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = labels if labels is not None else torch.tensor([r["labels"] for r in rows])
    return out
