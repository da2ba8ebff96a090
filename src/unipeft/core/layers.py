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


def callable_as_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """True when a delta may compute `module(x)` itself as F.linear(x, weight, bias): a plain float
    nn.Linear at x's dtype, without hooks, autocast or tracing (any of which the direct call would skip)."""
    return (type(module) is nn.Linear and module.weight.dtype == x.dtype and x.dtype.is_floating_point
            and not module._forward_hooks and not module._forward_pre_hooks
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type))


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
def _is_4bit(w) -> bool:
    """True for a bitsandbytes Params4bit that has been quantized."""
    return getattr(w, "quant_state", None) is not None


def is_packed(module: nn.Module, name: str = "weight") -> bool:
    """True when parameter `name` is stored quantized (writes requantize it; an 8-bit layer keeping
    fp16 weights is not packed), so only an exact snapshot can undo a write."""
    return name == "weight" and is_quantized(module) and not getattr(module.weight, "has_fp16_weights", False)


def _int8_scales(module: nn.Module):
    """The row absmax of an int8 weight (Linear8bitLt.forward moves it from weight.SCB to state.SCB)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None and getattr(module, "state", None) is not None:
        scb = module.state.SCB
    return scb


def _unpack_cpu_format(data: torch.Tensor, qs):
    """Copies in the standard layout of a weight that eval-mode CPU Linear4bit.forward repacked for AVX512-BF16."""
    import copy

    import bitsandbytes.functional as bf

    qs = copy.deepcopy(qs)
    absmax = qs.absmax  # (in/blocksize, out) bf16 after the conversion: what the kernel uses
    qs.original_nested = False  # keep that absmax rather than requantize it
    data, qs = bf._convert_weight_packed_for_cpu_inverse(data, qs)
    qs.absmax = absmax.T.reshape(-1).to(torch.float32).contiguous()
    return data, qs


def keep_training_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of `model` in bitsandbytes' standard layout, in eval mode too.

    On an AVX512-BF16 CPU, an eval-mode no-grad Linear4bit.forward repacks its weight for an
    inference kernel (gemv_4bit) that has no backward and that every later forward uses, training
    ones included: gradients then silently stop at the layer. Adapted models turn that repacking
    off (eval outputs equal the training-mode product) and unpack a layer already repacked.
    """
    for module in model.modules():
        if not is_quantized(module) or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        w = module.weight
        if _is_4bit(w) and getattr(w.quant_state, "packing_format_for_cpu", False):
            import bitsandbytes as bnb

            data, qs = _unpack_cpu_format(w.data, w.quant_state)
            _set_packed(module, bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                                  compress_statistics=False, quant_type=qs.quant_type,
                                                  quant_storage=w.quant_storage, module=module, bnb_quantized=True))


def _dequantize(w: torch.Tensor, scb=None) -> torch.Tensor:
    """The float32 (out, in) value of a 4-bit weight, or of an int8 weight with row scales `scb`."""
    if _is_4bit(w):  # packed uint8 + quant state
        import bitsandbytes.functional as bf

        data, qs = w.data, w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            data, qs = _unpack_cpu_format(data, qs)
        return bf.dequantize_4bit(data, qs).to(torch.float32)
    if w.dtype != torch.int8:  # an 8-bit layer keeping fp16 weights (quantized on the fly)
        return w.data.to(torch.float32)
    # int8 rows * absmax / 127, in the order bitsandbytes' CPU/XPU matmul (MatMul8bitFp) computes it.
    return w.data.to(torch.float32) * (scb.to(torch.float32)[:, None] * (1.0 / 127.0))


def _dequantized(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) value of a quantized layer's weight."""
    w = module.weight
    return _dequantize(w, _int8_scales(module) if w.dtype == torch.int8 else None)


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
    if _is_4bit(old):
        qs = old.quant_state
        # Quantize from the dtype the weight was quantized from (eval-mode CPU packing sets
        # qs.dtype to bfloat16 and keeps the original in qs.original_dtype).
        dtype = qs.original_dtype if getattr(qs, "packing_format_for_cpu", False) else qs.dtype
        new = bnb.nn.Params4bit(value.detach().to(dtype).contiguous(), requires_grad=False,
                                quant_type=qs.quant_type, blocksize=qs.blocksize,
                                compress_statistics=old.compress_statistics, quant_storage=old.quant_storage)
        return new.to(old.device)  # quantizes
    # Int8Params quantizes on a move off the CPU (or to it), so build it there.
    new = bnb.nn.Int8Params(value.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                            has_fp16_weights=False)
    return new.to(old.device)


def _set_packed(module: nn.Module, weight: nn.Parameter, scb=None) -> None:
    """Install a packed weight and keep the layer's cached quantization state consistent with it."""
    module.weight = weight
    if _is_4bit(weight):
        if hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state
        return
    # Linear8bitLt.forward moves weight.CB/SCB into module.state once (when weight.CB is set) and
    # then uses the state: give the weight its int8 rows and scales and clear the stale state.
    weight.CB = weight.data
    if scb is not None:
        weight.SCB = scb
    if getattr(module, "state", None) is not None:
        module.state.reset_grads()


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a base parameter to `value` (stored layout); quantized weights are requantized."""
    if is_packed(module, name):
        _set_packed(module, _quantize_like(module, value))
        return
    param = dict(module.named_parameters())[name]
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def requantization_error(module: nn.Module, value: torch.Tensor) -> float:
    """Largest |value - what write_param would store| (0 for unquantized layers)."""
    if not is_packed(module):
        return 0.0
    new = _quantize_like(module, value)
    stored = _dequantize(new, new.SCB if new.dtype == torch.int8 else None)
    return float((stored - value.detach().to(stored.device, torch.float32)).abs().max())


def snapshot_param(module: nn.Module, name: str):
    """An exact copy of a base parameter (the packed tensor and its quantization state when quantized)."""
    param = dict(module.named_parameters())[name]
    if is_packed(module, name):
        # write_param replaces the Parameter object (never writes into it), so keeping it is a copy;
        # int8 scales are kept apart since Linear8bitLt.forward moves them off the weight.
        return ("packed", param, _int8_scales(module) if param.dtype == torch.int8 else None)
    return ("dense", param.detach().clone(), None)


def restore_param(module: nn.Module, name: str, snap) -> None:
    """Put back what snapshot_param() saved, bit for bit."""
    how, saved, scb = snap
    if how == "packed":
        _set_packed(module, saved, scb)
        return
    param = dict(module.named_parameters())[name]
    with torch.no_grad():
        param.copy_(saved)


def check_writable(module: nn.Module, name: str, path: str) -> None:
    """MergeError unless `name` is a parameter of `module`."""
    if name not in dict(module.named_parameters()):
        raise MergeError(f"'{path}' ({type(module).__name__}) has no parameter '{name}'")


def scale_packed_rows(module: nn.Module, g: torch.Tensor) -> bool:
    """Multiply row i of a packed weight by g[i] by scaling its stored scales (4-bit blockwise absmax
    kept in float32, int8 row absmax SCB); the packed codes are untouched and a new Parameter is
    installed (snapshots stay exact). False, writing nothing, when that is not exact: double-quantized
    absmax, blocks spanning rows, the eval-mode CPU repacked layout, or some g[i] <= 0 / not finite."""
    g = g.detach().to(torch.float32)
    if not is_packed(module) or not (torch.isfinite(g).all() and (g > 0).all()):
        return False
    old = module.weight
    if _is_4bit(old):
        import copy

        import bitsandbytes as bnb

        qs = old.quant_state
        if (qs.nested or getattr(qs, "packing_format_for_cpu", False) or module.in_features % qs.blocksize
                or qs.absmax.dtype != torch.float32):
            return False
        qs = copy.copy(qs)
        qs.absmax = (qs.absmax.view(module.out_features, -1) * g.to(qs.absmax.device)[:, None]).reshape(-1)
        new = bnb.nn.Params4bit(old.data, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=qs.quant_type,
                                quant_storage=old.quant_storage, module=getattr(old, "module", None),
                                bnb_quantized=True)
        _set_packed(module, new)
        return True
    import bitsandbytes as bnb

    scb = _int8_scales(module)
    new = bnb.nn.Int8Params(old.data, requires_grad=False, has_fp16_weights=False)
    _set_packed(module, new, scb * g.to(scb.device, scb.dtype))
    return True


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers in backward (activation / gradient checkpointing)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:  # older transformers
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)
