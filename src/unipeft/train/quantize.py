"""Quantized bases (QLoRA): the run config's `quantization` section and a layer-by-layer loader.

`quantization: {bits: 4, type: nf4, double_quant: true}` (or `bits: 8`) becomes transformers'
BitsAndBytesConfig. The model is built the field's way -- transformers' bitsandbytes quantizer
replaces the linears and quantizes each weight with the same bitsandbytes calls as
`from_pretrained(quantization_config=...)`, so the packed weights are identical -- but the
weights are streamed from the safetensors file one tensor at a time, each quantized before the
next is read, so loading never holds a full-precision copy of the model (from_pretrained's
loading peak on SmolLM2 is 2-3x the fp32 model's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.errors import ConfigError

BNB_INSTALL = "pip install bitsandbytes==0.50.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class QuantizationConfig:
    """How the frozen base is stored: full precision (bits: null), 4-bit (NF4/FP4) or 8-bit (LLM.int8)."""

    bits: int | None = None
    type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type
    double_quant: bool = True  # 4-bit: quantize the block scales too (QLoRA's double quantization)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # 4-bit: dtype of the dequantized matmul
    skip_modules: list[str] | None = None  # kept in full precision; None: transformers' default (lm_head)

    def validate(self) -> None:
        """ConfigError naming the field for a spec bitsandbytes cannot do."""
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"quantization.bits: bitsandbytes quantizes to 4 or 8 bits, got {self.bits!r} "
                              f"(null: full-precision base)")
        if self.type not in ("nf4", "fp4"):
            raise ConfigError(f"quantization.type: expected 'nf4' or 'fp4', got {self.type!r}")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"quantization.compute_dtype: expected one of {list(DTYPES)}, got {self.compute_dtype!r}")
        if self.bits == 8 and (self.type != "nf4" or not self.double_quant):
            raise ConfigError("quantization.type / double_quant: only for bits: 4 (8-bit LLM.int8 has neither)")

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def bnb_config(self) -> Any:
        """transformers' BitsAndBytesConfig for this spec."""
        try:
            import bitsandbytes  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(f"quantization: needs bitsandbytes; install it with: {BNB_INSTALL}") from None
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.skip_modules)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
                                  llm_int8_skip_modules=self.skip_modules)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"quantization: {path} holds no *.safetensors weights; a quantized base is loaded "
                          f"from a safetensors folder")
    return files


def load_quantized(path: str | Path, auto_cls: Any, quant: QuantizationConfig, **kwargs: Any) -> nn.Module:
    """`auto_cls.from_pretrained(path, quantization_config=quant.bnb_config())`, streamed tensor by tensor."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    path = Path(path)
    files = _weight_files(path)
    bnb_config = quant.bnb_config()
    config = AutoConfig.from_pretrained(str(path), **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    with init_empty_weights(include_buffers=False):
        model = auto_cls.from_config(config, dtype=torch.float32)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"}, dtype=torch.float32)
    convert = quantizer.get_quantize_ops()
    expected = set(model.state_dict())
    seen: set[str] = set()
    for file in files:
        for name, value in read_tensors(file):
            key = _model_key(name, expected)
            if key is None:
                continue
            if value.is_floating_point():  # integer buffers (e.g. position ids) keep their dtype
                value = value.to(torch.float32)
            if quantizer.param_needs_quantization(model, key):
                param = convert.convert({key: [value]}, model=model, full_layer_name=key)[key]
                owner, leaf = _owner(model, key)
                setattr(owner, leaf, param)
            else:
                set_module_tensor_to_device(model, key, "cpu", value=value)
            seen.add(key)
            del value
    model.tie_weights()
    missing = [k for k in expected - seen if _is_meta(model, k)]
    if missing:
        raise ConfigError(f"quantization: {path} lacks weights for {sorted(missing)[:3]} (and "
                          f"{max(0, len(missing) - 3)} more); it does not match its config.json")
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model.eval()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_tensors(file: Path):
    """(name, tensor) of a safetensors file, each read into its own memory with plain reads.

    safetensors' own reader maps the file, so every tensor read stays resident (as page cache
    counted in the process's RSS) until the file is closed; reading each byte range into a fresh
    buffer keeps only the tensor being quantized.
    """
    import json
    import struct

    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        start = 8 + size
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _DTYPES:
                raise ConfigError(f"quantization: {file}: tensor {name} has dtype {info['dtype']}, which the "
                                  f"loader does not read")
            begin, end = info["data_offsets"]
            value = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            fh.seek(start + begin)
            view = value.view(-1).view(torch.uint8) if value.numel() else value
            if fh.readinto(memoryview(view.numpy())) != end - begin:
                raise ConfigError(f"quantization: {file} is truncated at tensor {name}")
            yield name, value


def _model_key(name: str, expected: set[str]) -> str | None:
    """The model's name of a checkpoint tensor (a head-less checkpoint lacks the 'model.' prefix of a head model)."""
    if name in expected:
        return name
    return "model." + name if "model." + name in expected else None


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return model.get_submodule(path), leaf


def _is_meta(model: nn.Module, key: str) -> bool:
    owner, leaf = _owner(model, key)
    value = getattr(owner, leaf, None)
    return value is not None and getattr(value, "is_meta", False)
