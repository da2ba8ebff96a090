"""Tensor-at-a-time reading and writing of safetensors checkpoints, the all-or-nothing output folder, and
reading mergekit-style merge files.

Tensors are read with plain positioned reads, not a memory map: mapped pages of every source would count
toward the process's resident memory, so peak memory would grow with the number of sources.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import ConfigError, MergeError

# safetensors dtype names <-> torch dtypes (the ones a model checkpoint holds).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Files of the base copied beside the merged weights so the output folder loads as a model.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)


class TensorInfo:
    """Where one tensor lives: file, byte range, dtype name and shape."""

    __slots__ = ("file", "start", "end", "dtype", "shape")

    def __init__(self, file: Path, start: int, end: int, dtype: str, shape: tuple[int, ...]):
        self.file, self.start, self.end, self.dtype, self.shape = file, start, end, dtype, shape


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header into name -> TensorInfo (absolute byte offsets)."""
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint file {file}: expected a safetensors file, could not read it ({err})")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise MergeError(f"checkpoint {file}: tensor {name!r} has dtype {meta['dtype']}, which is not supported")
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(file, 8 + size + begin, 8 + size + end, meta["dtype"], tuple(meta["shape"]))
    return out


class Checkpoint:
    """A model checkpoint (one .safetensors file or a folder of shards) opened for reads of one tensor at a time."""

    def __init__(self, path: str | Path, field: str = "checkpoint"):
        self.path = Path(path)
        if self.path.is_dir():
            index = self.path / "model.safetensors.index.json"
            # A shard index names the model's files; without one every *.safetensors file in the folder is read.
            files = (sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
                     if index.is_file() else sorted(self.path.glob("*.safetensors")))
            self.folder = self.path
        elif self.path.is_file():
            files = [self.path]
            self.folder = self.path.parent
        else:
            raise ConfigError(f"{field}: expected a .safetensors file or a model folder, got {str(path)!r} (not found)")
        if not files:
            raise ConfigError(f"{field}: expected *.safetensors files in the folder {str(path)!r}, found none")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(file).items():
                if name in self.tensors:
                    raise MergeError(f"{field}: tensor {name!r} appears in two shards "
                                     f"({self.tensors[name].file.name}, {file.name})")
                self.tensors[name] = info
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk into fresh memory."""
        info = self.tensors[name]
        fh = self._handles.get(info.file)
        if fh is None:
            fh = self._handles[info.file] = open(info.file, "rb")
        buf = bytearray(info.end - info.start)
        fh.seek(info.start)
        if fh.readinto(buf) != len(buf):
            raise MergeError(f"checkpoint {info.file}: tensor {name!r} is cut short (the file is truncated)")
        if not buf:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)

    def config(self) -> dict:
        """The folder's config.json as a dict ({} if there is none)."""
        file = self.folder / "config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def close(self) -> None:
        """Close the open shard files."""
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


class StreamWriter:
    """Writes one safetensors file tensor by tensor: the header is laid out first from the known names,
    dtypes and shapes, then each tensor's bytes go straight to disk in that order."""

    def __init__(self, file: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict | None = None):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
        self._expected = [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        self._next = 0
        self.bytes_written = 0
        self._fh = open(file, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self.bytes_written = 8 + len(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout (same name, dtype and shape, in order)."""
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise MergeError(f"output tensor {name!r}: expected {exp_name!r} {exp_dtype} {exp_shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().view(-1)
        if data.numel():
            # Raw little-endian bytes of the storage, written without an extra copy (any dtype, bf16 too).
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += data.numel() * tensor.element_size()
        self._next += 1

    def abort(self) -> None:
        """Close the file after a failure (the caller deletes the folder)."""
        self._fh.close()

    def close(self) -> None:
        """Finish the file; every tensor of the layout must have been written."""
        self._fh.close()
        if self._next != len(self._expected):
            raise MergeError(f"output incomplete: {self._next} of {len(self._expected)} tensors written")


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; rename it to `out` on success, delete it on any error."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ConfigError(f"out: {str(out)!r} already exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def copy_side_files(folder: Path, dest: Path) -> list[str]:
    """Copy config and tokenizer files of a model folder into dest; return the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
            copied.append(name)
    return copied


# ---- mergekit-style merge files ----

_TOP_FIELDS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_UNSUPPORTED = {"slices", "modules", "tokenizer", "chat_template"}


def _local_model(value: Any, field: str, folder: Path) -> str:
    """A model path from the file: relative paths are read from the file's folder, else the working directory."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{field}: expected a local path to a model folder or .safetensors file, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and (folder / path).exists():
        path = folder / path
    if not path.exists():
        raise ConfigError(f"{field}: {str(value)!r} not found (a local path is needed; merges never download)")
    return str(path)


def merge_config_from_yaml(path: str | Path) -> dict:
    """Read a mergekit-style merge YAML into the keyword arguments of merge_checkpoints (all but out)."""
    from .checkpoint import METHODS, TASK_VECTOR_METHODS  # the method table lives with the merge code

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"merge config {str(path)!r}: could not read it as YAML ({err})")
    if not isinstance(data, dict):
        raise ConfigError(f"merge config {str(path)!r}: expected a mapping at the top, got {type(data).__name__}")
    for key in data:
        if key in _UNSUPPORTED:
            raise ConfigError(f"{key}: not supported here; list whole models under 'models:'")
        if key not in _TOP_FIELDS:
            raise ConfigError(f"{key}: unknown field; expected some of {sorted(_TOP_FIELDS)}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"merge_method: expected one of {list(METHODS)}, got {method!r}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise ConfigError(f"tokenizer_source: only 'base' is supported (its files are copied), "
                          f"got {data['tokenizer_source']!r}")
    folder = path.parent
    base = _local_model(data["base_model"], "base_model", folder) if data.get("base_model") is not None else None
    shared = data.get("parameters") or {}
    models = data.get("models")
    if not isinstance(shared, dict):
        raise ConfigError(f"parameters: expected a mapping, got {shared!r}")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"models: expected a non-empty list of {{model: PATH, parameters: {{...}}}}, got {models!r}")
    per_model = ({"weight", "density"} if method in TASK_VECTOR_METHODS
                 else {"weight"} if method == "linear" else set())
    sources, weights, densities = [], [], []
    for i, item in enumerate(models):
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "model" not in item or set(item) - {"model", "parameters"}:
            raise ConfigError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
        model = _local_model(item["model"], f"models[{i}].model", folder)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}].parameters: expected a mapping, got {params!r}")
        if method != "linear" and base is not None and Path(model).resolve() == Path(base).resolve():
            continue  # the base listed among the models only marks it as an input; its parameters are unused
        for key in set(params) - per_model:
            raise ConfigError(f"models[{i}].parameters.{key}: not a per-model parameter of {method!r}; "
                              f"expected some of {sorted(per_model)}")
        sources.append(model)
        if "weight" in per_model:
            weight = params.get("weight", shared.get("weight"))
            if weight is None:
                raise ConfigError(f"models[{i}].parameters.weight: required for method {method!r}")
            weights.append(weight)
        densities.append(params.get("density", shared.get("density", 1.0)))
    out = {"base": base, "sources": sources, "weights": weights or None, "method": method,
           "dtype": data.get("dtype"), "out_dtype": data.get("out_dtype")}
    out.update({k: v for k, v in shared.items() if k not in ("weight", "density")})
    if method in TASK_VECTOR_METHODS:
        out["density"] = densities
    elif "density" in shared:
        raise ConfigError(f"parameters.density: not a parameter of method {method!r}")
    return out
