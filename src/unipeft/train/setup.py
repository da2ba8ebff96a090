"""From a RunConfig to ready parts: data splits, tokenizer, (adapted) model, encoded sets, optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import ConfigError
from ..data.encode import EncodedSet, encode_split
from ..data.sources import load_data
from ..data.splits import Splits
from .config import FULL, RunConfig, build_method_config
from .models import load_base_model, load_tokenizer


@dataclass
class RunParts:
    """Everything built from a config before the first byte is written."""

    cfg: RunConfig
    splits: Splits
    tokenizer: Any
    model: nn.Module  # AdaptedModel, or the plain model for method 'full'
    method_config: AdapterConfig | dict[str, Any]
    label_names: list[str]

    @property
    def pad_id(self) -> int:
        """Token id used for padding."""
        tok = self.tokenizer
        return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0

    def encode(self, split: str) -> EncodedSet:
        """The named split, tokenized."""
        return encode_split(self.tokenizer, self.splits.get(split), self.cfg.data.max_length)


def apply_method(base: nn.Module, cfg: RunConfig, method_config: AdapterConfig | dict[str, Any]) -> nn.Module:
    """Adapt `base` with the method (classification heads are trained too, as PEFT's SEQ_CLS does)."""
    if cfg.method_name == FULL:
        patterns = method_config.get("trainable")
        if patterns:
            import re
            hits = 0
            for name, p in base.named_parameters():
                p.requires_grad_(any(re.search(rx, name) for rx in patterns))
                hits += p.requires_grad
            if not hits:
                raise ConfigError(f"method.trainable={patterns!r} matches no parameter of {type(base).__name__}")
        return base
    from ..core.model import adapt
    from ..interop.peft import apply_task_type

    if method_config.task_type is None:  # recorded in adapter_config.json, as PEFT does
        method_config = method_config.replace(task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM")
    return adapt(base, apply_task_type(method_config))


def build_parts(cfg: RunConfig, splits: Splits | None = None) -> RunParts:
    """Load data, tokenizer and model, and apply the method; raises UnipeftError on bad input."""
    method_config = build_method_config(cfg.method)
    if splits is None:
        splits = load_data(cfg.task, cfg.data, cfg.data_seed)
    label_names = splits.label_names
    if cfg.model.name == "mlp" and not hasattr(splits.train, "features"):
        raise ConfigError("model 'mlp' takes vectors (data.source: digits); for text use model: minilm or a folder")
    tokenizer = load_tokenizer(cfg.model.name)
    in_features = int(splits.train.features.shape[1]) if hasattr(splits.train, "features") else 0
    base = load_base_model(cfg.model, cfg.task, label_names, cfg.seed, in_features)
    model = apply_method(base, cfg, method_config)
    return RunParts(cfg, splits, tokenizer, model, method_config, label_names)
