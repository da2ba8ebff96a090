"""Layer geometry, in one place: what a base layer computes and how its weight is read and written.

Every method and core/site.py go through this module; no other file tests for GPT-2's Conv1D or
for a quantized linear. The dense view of a matrix layer is always (out, in):

  nn.Linear          weight (out, in)
  GPT-2 Conv1D       weight (in, out): stored transposed
  bitsandbytes 4/8-bit linears: packed weight, dequantized for reading, requantized on write
  nn.Conv1d/2d/3d    weight (out, in/groups, *kernel)
  nn.Embedding       weight (num_embeddings, dim)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import MergeError, TargetError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# bitsandbytes' quantized linears, recognised by class without importing bitsandbytes (an optional,
# slow-to-import extra): both subclass nn.Linear, so they are matrix layers for isinstance checks.
QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")
# Layers whose weight is one (out, in) matrix applied to the last input dimension.
MATRIX_LAYERS: tuple[type, ...] = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Geometry:
    """(in, out) features and the kind of a base layer."""

    in_features: int
    out_features: int
    kind: str  # "linear" | "transposed" | "quantized" | "conv" | "embedding"
    kernel_size: tuple[int, ...] = ()

    @property
    def is_matrix(self) -> bool:
        """True for layers whose weight is one (out, in) matrix."""
        return self.kind in ("linear", "transposed", "quantized")


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear."""
    return any(c.__name__ in QUANTIZED_CLASSES and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


def is_transposed(module: nn.Module) -> bool:
    """True when the stored weight is (in, out) (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def is_matrix_layer(module: nn.Module) -> bool:
    """True for Linear, GPT-2 Conv1D and quantized linears."""
    return isinstance(module, MATRIX_LAYERS)


def geometry(module: nn.Module) -> Geometry:
    """The geometry of a supported layer; TargetError for any other module."""
    if is_quantized(module):
        return Geometry(module.in_features, module.out_features, "quantized")
    if isinstance(module, Conv1D):
        return Geometry(module.weight.shape[0], module.weight.shape[1], "transposed")
    if isinstance(module, nn.Linear):
        return Geometry(module.in_features, module.out_features, "linear")
    if isinstance(module, CONVS):
        return Geometry(module.in_channels, module.out_channels, "conv", tuple(module.kernel_size))
    if isinstance(module, nn.Embedding):
        return Geometry(module.num_embeddings, module.embedding_dim, "embedding")
    raise TargetError(f"no layer geometry for a {type(module).__name__}")


# ---- reading --------------------------------------------------------------------------------
def _dequantized(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bf

    w = module.weight
    if getattr(w, "quant_state", None) is not None:  # 4-bit: packed uint8 + quant state
        return bf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    scb = getattr(w, "SCB", None)  # 8-bit: int8 rows + per-row absmax
    if scb is None:
        return w.data.to(torch.float32)
    return w.data.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a dense (out, in) matrix for matrix layers (dequantized: a new float tensor),
    the stored weight otherwise; differentiable for unquantized layers."""
    if is_quantized(module):
        return _dequantized(module)
    w = module.weight
    return w.T if is_transposed(module) else w


def to_param_layout(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix in the layout the module stores its weight (transposed for Conv1D)."""
    return dense.T if is_transposed(module) else dense


def param_value(module: nn.Module, name: str) -> torch.Tensor:
    """A base parameter's value in its stored layout, dequantized for quantized weights."""
    if name == "weight" and is_quantized(module):
        return _dequantized(module)
    return dict(module.named_parameters())[name].detach()


# ---- writing (merge / unmerge / base edits) -----------------------------------------------
def _quantize_like(module: nn.Module, value: torch.Tensor) -> nn.Parameter:
    """A new packed weight holding `value` with the module's quantization settings."""
    import bitsandbytes as bnb

    old = module.weight
    if getattr(old, "quant_state", None) is not None:
        qs = old.quant_state
        new = bnb.nn.Params4bit(value.to(torch.float32).contiguous(), requires_grad=False,
                                quant_type=qs.quant_type, blocksize=qs.blocksize,
                                compress_statistics=old.compress_statistics, quant_storage=old.quant_storage)
        return new.to(old.device)
    new = bnb.nn.Int8Params(value.to(torch.float32).contiguous(), requires_grad=False, has_fp16_weights=False)
    return new.to(old.device)


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a base parameter to `value` (stored layout); quantized weights are requantized."""
    if name == "weight" and is_quantized(module):
        module.weight = _quantize_like(module, value)
        return
    param = dict(module.named_parameters())[name]
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def requantization_error(module: nn.Module, value: torch.Tensor) -> float:
    """Largest |value - what write_param would store| (0 for unquantized layers)."""
    if not is_quantized(module):
        return 0.0
    probe = type(module).__new__(type(module))
    nn.Module.__init__(probe)
    probe.weight = _quantize_like(module, value)
    return float((_dequantized(probe) - value.to(torch.float32)).abs().max())


def snapshot_param(module: nn.Module, name: str):
    """An exact copy of a base parameter (the packed tensor and its quantization state when quantized)."""
    param = dict(module.named_parameters())[name]
    if name == "weight" and is_quantized(module):
        return ("packed", param)  # write_param replaces the Parameter object, so keeping it is a copy
    return ("dense", param.detach().clone())


def restore_param(module: nn.Module, name: str, snap) -> None:
    """Put back what snapshot_param() saved, bit for bit."""
    how, saved = snap
    if how == "packed":
        module.weight = saved
        return
    param = dict(module.named_parameters())[name]
    with torch.no_grad():
        param.copy_(saved)


def check_writable(module: nn.Module, name: str, path: str) -> None:
    """MergeError unless `name` is a parameter of `module`."""
    if name not in dict(module.named_parameters()):
        raise MergeError(f"'{path}' ({type(module).__name__}) has no parameter '{name}'")
