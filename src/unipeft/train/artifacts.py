"""Load a finished run folder (config.yaml + summary.json + adapter/ or trainable.safetensors) back for eval/predict."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..core.calibration import calibration_data
from ..core.errors import ConfigError
from ..data.splits import Splits
from .config import RunConfig, config_from_dict
from .models import load_base_model, load_tokenizer
from .run import SUMMARY, partial_dir


@dataclass
class LoadedRun:
    """A trained model with its tokenizer, config and class names."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    summary: dict[str, Any]


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the base model of a finished run and load its trained weights (eval mode)."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).is_file():
        hint = (f"; {partial_dir(run_dir)} holds an unfinished run (unipeft train CONFIG --resume)"
                if partial_dir(run_dir).exists() else "")
        raise ConfigError(f"{run_dir} is not a finished unipeft run (no {SUMMARY}){hint}")
    summary = json.loads((run_dir / SUMMARY).read_text())
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
    labels = list(summary.get("label_names") or [])
    tokenizer = load_tokenizer(cfg.model.name)
    in_features = int(summary.get("in_features") or 0)
    base = load_base_model(cfg.model, cfg.task, labels, cfg.seed, in_features, cfg.quantization)
    batches = None
    if cfg.strategy.needs_calibration():  # a data-aware init: the run's calibration batches rebuild its base residual
        from ..data.sources import load_data
        from .calibrate import run_calibration
        batches = run_calibration(cfg, load_data(cfg.task, cfg.data, cfg.data_seed), tokenizer)
    with calibration_data(batches):
        model = cfg.strategy.load(base, run_dir)
    return LoadedRun(cfg, model.eval(), tokenizer, labels, summary)


@torch.no_grad()
def classify(run: LoadedRun, texts: list[str], batch_size: int = 32) -> list[tuple[str, float]]:
    """(label name, probability) of each text."""
    out: list[tuple[str, float]] = []
    for s in range(0, len(texts), batch_size):
        batch = run.tokenizer(texts[s:s + batch_size], truncation=True, max_length=run.cfg.data.max_length,
                              padding=True, return_tensors="pt")
        probs = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
        conf, idx = probs.max(-1)
        out += [(run.label_names[i], float(c)) for i, c in zip(idx.tolist(), conf.tolist())]
    return out


def generate(run: LoadedRun, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of each prompt (causal LM runs; see train/generate.py)."""
    from .generate import generate as generate_texts

    return generate_texts(run.model, run.tokenizer, prompts, name=run.cfg.model.name, max_new_tokens=max_new_tokens,
                          chat=bool(run.cfg.data.chat_template))


def input_lines(given: list[str], file: str | None, verb: str) -> list[str]:
    """Inputs of `unipeft predict` / `generate`: the arguments, then the non-blank lines of --file ('-': stdin)."""
    import sys

    lines = list(given)
    if file is not None:
        source = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        lines += [line for line in source.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{verb}: give inputs as arguments or with --file")
    return lines


def eval_splits(run: LoadedRun, data_file: str | None = None) -> Splits:
    """The run's own data splits, or a single file evaluated as the 'test' split."""
    from ..data.sources import load_data
    if data_file is None:
        return load_data(run.cfg.task, run.cfg.data, run.cfg.data_seed)
    from ..data.files import read_labeled_texts, read_prompt_completions
    d = run.cfg.data
    if run.cfg.task == "classification":
        data = read_labeled_texts(data_file, d.text_column, d.label_column, d.format, run.label_names)
    else:
        data = read_prompt_completions(data_file, d.prompt_column, d.completion_column, d.format)
    return Splits(data, data, data)
