"""The ReFT family (Wu et al., 2024): low-rank interventions on hidden states at chosen positions.

At each selected position of a layer's output h (the first `prefix_positions` and the last
`suffix_positions` tokens of the sequence),

    LoReFT:  h + R^T (W h + b - R h)     R: r x d with orthonormal rows (orthogonality=True)
    NoReFT:  the same with an unconstrained R
    DiReFT:  h + R^T (W h + b)           no orthogonality, no subtraction

(`non_linearity` wraps W h + b; `dropout` acts on the intervened states, as in AdapterHub.) Prefix and
suffix positions get separate (W, b, R) unless `tied_weights`. Sites are transformer blocks (their output is
the residual stream), by default every block, or those of `layers`; a LayerNorm whose output is a hidden
state (BERT's `output.LayerNorm`) can also be named in `target_modules`. A (batch, d) output counts as one position.

Positions count from the ends of the padded sequence: the deltas do not see the attention mask (see
the report on padding-aware positions). With a KV cache, each decoding step's new token is both
first and last position of its call. Random W, b and R: not the identity at init; position-wise and
non-linear in h: not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError, TargetError
from ...core.fields import Rule, fraction, non_negative_int, positive_int, ruled
from ...core.registry import Capabilities, register
from ._common import ACTIVATIONS, flag

# Transformer blocks by class name (subclasses included), so no model code is imported to recognise them.
BLOCK_NAMES = frozenset({
    "BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "DebertaLayer", "DebertaV2Layer",
    "TransformerBlock", "ViTLayer", "GPT2Block", "GPTNeoBlock", "GPTJBlock", "GPTNeoXLayer", "OPTDecoderLayer",
    "LlamaDecoderLayer", "MistralDecoderLayer", "MixtralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
    "GemmaDecoderLayer", "Gemma2DecoderLayer", "PhiDecoderLayer", "Phi3DecoderLayer", "T5Block"})
# Names of the module lists holding those blocks: `layers` selects '<list>.<i>' by index.
BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")


class _BlockMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return any(c.__name__ in BLOCK_NAMES for c in type(obj).__mro__)


class TransformerBlock(metaclass=_BlockMeta):
    """isinstance(m, TransformerBlock): m is one block of a transformer (by class name, see BLOCK_NAMES)."""


# Blocks, or a LayerNorm whose output is a layer's hidden state (BERT's `output.LayerNorm`). Not linears:
# their outputs are rarely the residual stream, and a quantized linear must never look like a target.
LAYER_TYPES = (TransformerBlock, nn.LayerNorm)


def is_block(path: str, module: nn.Module) -> bool:
    """Default sites: every transformer block."""
    return isinstance(module, TransformerBlock)


def layers_regex(indices: list[int]) -> str:
    """target_modules selecting the blocks `indices` of the model's block list."""
    return rf".*\.(?:{'|'.join(BLOCK_LISTS)})\.(?:{'|'.join(str(i) for i in sorted(set(indices)))})"


def _is_layers(v) -> bool:
    return v == "all" or (isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                   and i >= 0 for i in v))


@dataclass
class ReftConfig(AdapterConfig):
    """A ReFT intervention of rank `r` on hidden states at prefix/suffix positions (AdapterHub's fields)."""

    peft_type = "REFT"
    not_in_peft = ("hidden_size",)
    layers: list[int] | str = ruled("all", Rule(_is_layers, "'all' or a non-empty list of layer indices >= 0"))
    prefix_positions: int = non_negative_int(3)
    suffix_positions: int = non_negative_int(0)
    r: int = positive_int(1)
    orthogonality: bool = flag(True)
    tied_weights: bool = flag(False)
    subtract_projection: bool = flag(True)
    dropout: float = fraction(0.05)
    non_linearity: str | None = ruled(None, Rule(lambda v: v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}",
                                                 optional=True))
    hidden_size: int | None = positive_int(None, optional=True)  # resolved: width of a block's output

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if isinstance(self.layers, list) and self.target_modules is None and _is_layers(self.layers):
            self.target_modules = layers_regex(self.layers)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if self.prefix_positions + self.suffix_positions == 0:
            raise ConfigError(f"{owner}: prefix_positions and suffix_positions are both 0, so no position is "
                              f"intervened on; set at least one > 0")
        if isinstance(self.layers, list) and self.target_modules != layers_regex(self.layers):
            raise ConfigError(f"{owner}.layers={self.layers!r} selects blocks, but target_modules="
                              f"{self.target_modules!r} is also set; give one of them (set target_modules=None "
                              f"when changing layers)")

    def resolved_fields(self, model, targets) -> dict:
        """The hidden width of the model's blocks (from its config)."""
        if not any(isinstance(m, TransformerBlock) for _, m in targets):
            return {}
        cfg = getattr(model, "config", None)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if not isinstance(width, int):
            raise TargetError(f"{type(self).__name__}: cannot read the hidden width of {type(model).__name__}'s "
                              f"blocks from its config; set hidden_size")
        return {"hidden_size": self.hidden_size or width}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Rank 2 at the first two and last token, no dropout (toy sequences have 7 tokens)."""
        return {"r": 2, "prefix_positions": 2, "suffix_positions": 1, "dropout": 0.0}


@dataclass
class LoReftConfig(ReftConfig):
    """LoReFT: h + R^T (W h + b - R h), R with orthonormal rows."""

    peft_type = "LOREFT"


@dataclass
class NoReftConfig(ReftConfig):
    """NoReFT: LoReFT without the orthogonality constraint."""

    peft_type = "NOREFT"
    orthogonality: bool = flag(False)


@dataclass
class DiReftConfig(ReftConfig):
    """DiReFT: h + R^T (W h + b), no orthogonality and no subtraction."""

    peft_type = "DIREFT"
    orthogonality: bool = flag(False)
    subtract_projection: bool = flag(False)


class ReftUnit(nn.Module):
    """One intervention h -> dropout(h + R^T (act(W h + b) - R h)) on (..., d) states."""

    def __init__(self, d: int, config: ReftConfig) -> None:
        super().__init__()
        self.learned_source = nn.Linear(d, config.r)
        projection = nn.Linear(d, config.r, bias=False)
        self.projection = parametrizations.orthogonal(projection) if config.orthogonality else projection
        self.subtract = config.subtract_projection
        self.act = ACTIVATIONS[config.non_linearity]() if config.non_linearity else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        source = self.act(self.learned_source(h))
        if self.subtract:
            source = source - self.projection(h)
        # F.linear on contiguous states: matmul folds strided inputs only when the weight requires grad,
        # which would change the last bits between a trainable and a frozen (loaded) adapter
        return self.dropout(h + F.linear(source, self.projection.weight.t()))


class ReftDelta(Delta):
    """ReFT units applied to the prefix and suffix positions of the site's output."""

    identity_at_init = False

    def __init__(self, base: nn.Module, config: ReftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if isinstance(base, TransformerBlock):
            d = config.hidden_size
        else:
            d = base.normalized_shape[-1]
        if config.r > d and config.orthogonality:
            raise TargetError(f"{type(config).__name__}.r={config.r} exceeds the width {d} of '{path}': R cannot "
                              f"have {config.r} orthonormal rows")
        self.prefix, self.suffix = config.prefix_positions, config.suffix_positions
        sides = 1 if config.tied_weights else int(self.prefix > 0) + int(self.suffix > 0)
        self.units = nn.ModuleList(ReftUnit(d, config) for _ in range(sides))
        self.train(base.training)  # dropout / stochastic depth follow the base's train/eval mode

    def _intervene(self, out: torch.Tensor) -> torch.Tensor:
        h = out if out.dim() >= 3 else out.unsqueeze(1)  # (B, d): a single position
        length = h.shape[1]
        p, s = min(self.prefix, length), min(self.suffix, length)
        dtype = self.units[0].learned_source.weight.dtype
        new = h
        if len(self.units) == 1:  # tied, or one side only
            pref = suff = self.units[0]
        else:
            pref, suff = self.units
        if p:  # prefix first, then suffix on top where they overlap (both read the original states)
            idx = torch.arange(p, device=h.device)
            new = new.index_copy(1, idx, pref(h[:, :p].to(dtype).contiguous()).to(h.dtype))
        if s:
            idx = torch.arange(length - s, length, device=h.device)
            new = new.index_copy(1, idx, suff(h[:, length - s:].to(dtype).contiguous()).to(h.dtype))
        return new if out.dim() >= 3 else new.squeeze(1)

    def forward(self, x, base_out):
        if isinstance(base_out, tuple):  # blocks of older transformers return (hidden, ...)
            return (self._intervene(base_out[0]), *base_out[1:])
        return self._intervene(base_out)


_CAPS = Capabilities(mergeable=False, mixed_batch=True, layer_types=LAYER_TYPES)
register("loreft", LoReftConfig, ReftDelta, _CAPS, default_targets=is_block)
register("noreft", NoReftConfig, ReftDelta, _CAPS, default_targets=is_block)
register("direft", DiReftConfig, ReftDelta, _CAPS, default_targets=is_block)
