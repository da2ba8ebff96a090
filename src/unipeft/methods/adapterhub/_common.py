"""Pieces the AdapterHub-style methods share: activations, default placements, bottleneck widths, gates.

Placement follows the unified view used by unipeft's bottleneck adapters: a sequential adapter sits on
the output of the sub-layer it follows (attention output projection, feed-forward output projection).
The default targets below name those projections in BERT-, GPT-2- and Llama-style models.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core import layers
from ...core.errors import ConfigError, TargetError
from ...core.fields import Rule, ruled

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}

# Output projections of attention and feed-forward blocks (path suffixes, '.'-bounded).
ATTENTION_OUTPUTS = ("attention.output.dense", "attn.c_proj", "self_attn.o_proj", "attn.out_proj")
FFN_OUTPUTS = ("mlp.c_proj", "mlp.down_proj", "mlp.fc2")


def flag(default: bool):
    """A config field that must be True or False."""
    return ruled(default, Rule(lambda v: isinstance(v, bool), "True or False"))


def _ends(path: str, suffixes: tuple[str, ...]) -> bool:
    return any(path == s or path.endswith("." + s) for s in suffixes)


def is_ffn_output(path: str, module: nn.Module) -> bool:
    """The feed-forward block's output projection (BERT: `layer.N.output.dense`)."""
    if not layers.is_matrix_layer(module):
        return False
    bert_ffn = path.endswith(".output.dense") and not path.endswith("attention.output.dense")
    return bert_ffn or _ends(path, FFN_OUTPUTS)


def is_attention_output(path: str, module: nn.Module) -> bool:
    """The attention block's output projection (self-attention only: cross-attention is not a default)."""
    return layers.is_matrix_layer(module) and _ends(path, ATTENTION_OUTPUTS) and "crossattention" not in path


def is_houlsby_site(path: str, module: nn.Module) -> bool:
    """Houlsby placement: after attention and after the feed-forward block."""
    return is_attention_output(path, module) or is_ffn_output(path, module)


def bottleneck_width(owner: str, path: str, d: int, reduction_factor: float, multiple_of: int = 1) -> int:
    """AdapterHub's bottleneck width `d // reduction_factor`, checked to be >= 1 (and a multiple of
    `multiple_of`, the PHM dimension); TargetError naming the module otherwise."""
    width = int(d // reduction_factor)
    if width < 1:
        raise TargetError(f"{owner}.reduction_factor={reduction_factor} leaves no bottleneck for '{path}' "
                          f"(width {d}); use a reduction_factor <= {d}")
    if width % multiple_of or d % multiple_of:
        raise TargetError(f"{owner}.phm_dim={multiple_of} must divide both the width {d} of '{path}' and its "
                          f"bottleneck width {width} (= {d} // reduction_factor {reduction_factor})")
    return width


def check_reduction_factor(owner: str, value) -> None:
    """A positive number (AdapterHub also allows per-layer dicts; unipeft does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{owner}.reduction_factor: expected a positive number (hidden width / bottleneck "
                          f"width), got {value!r}")


def out_width(module: nn.Module) -> int:
    """Output features of a matrix layer."""
    return layers.geometry(module).out_features


def in_width(module: nn.Module) -> int:
    """Input features of a matrix layer."""
    return layers.geometry(module).in_features


def mean_gate(gate: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """UniPELT's gate: sigmoid(gate(h)) averaged over the sequence, shaped to scale (B, T, d) or (B, d)."""
    g = torch.sigmoid(gate(h.to(gate.weight.dtype)))  # (B, T, heads) or (B, heads)
    if g.dim() >= 3:
        g = g.mean(dim=tuple(range(1, g.dim() - 1)), keepdim=True)
    return g
