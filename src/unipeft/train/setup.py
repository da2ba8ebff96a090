"""From a RunConfig to ready parts: data splits, tokenizer, (calibrated and adapted) model, encoded sets, optimizer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..data.encode import EncodedSet, encode_split
from ..data.sources import load_data
from ..data.splits import Splits
from .calibrate import run_calibration
from .config import RunConfig
from .models import load_base_model, load_tokenizer
from .strategy import MethodConfig


@dataclass
class RunParts:
    """Everything built from a config before the first byte is written."""

    cfg: RunConfig
    splits: Splits
    tokenizer: Any
    model: nn.Module  # AdaptedModel, or the plain model for method 'full'
    method_config: MethodConfig  # cfg.method_config: an AdapterConfig, or a FullFineTuneConfig for 'full'
    label_names: list[str]

    @property
    def pad_id(self) -> int:
        """Token id used for padding."""
        tok = self.tokenizer
        return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0

    def encode(self, split: str) -> EncodedSet:
        """The named split, tokenized."""
        return encode_split(self.tokenizer, self.splits.get(split), self.cfg.data.max_length,
                            self.cfg.data.chat_template)


def build_parts(cfg: RunConfig, splits: Splits | None = None) -> RunParts:
    """Load data, tokenizer and model, and apply the method; raises UnipeftError on bad input."""
    if splits is None:
        splits = load_data(cfg.task, cfg.data, cfg.data_seed)
    label_names = splits.label_names
    if cfg.model.name == "mlp" and not hasattr(splits.train, "features"):
        raise ConfigError("model 'mlp' takes vectors (data.source: digits); for text use model: minilm or a folder")
    tokenizer = load_tokenizer(cfg.model.name)
    in_features = int(splits.train.features.shape[1]) if hasattr(splits.train, "features") else 0
    base = load_base_model(cfg.model, cfg.task, label_names, cfg.seed, in_features, cfg.quantization)
    # the calibrate step: batches of the training split when the method's init needs data
    model = cfg.strategy.apply(base, calibration=run_calibration(cfg, splits, tokenizer))
    return RunParts(cfg, splits, tokenizer, model, cfg.method_config, label_names)
