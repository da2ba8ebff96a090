"""State naming and save/load in PEFT's on-disk layout (adapter_config.json + safetensors; an older PEFT
folder's adapter_model.bin is read too, tensors only)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bank import Bank, bank_keys, bank_state
from .calibration import LOADING
from .config import CONFIG_NAME, AdapterConfig
from .delta import Delta
from .errors import AdapterLoadError, ConfigError
from .targets import logical_modules

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT folders (torch.save); read with weights_only only
PREFIX = AdapterConfig.state_prefix


def _key_prefix(model, adapter_name: str, site, delta) -> str:
    """Where a delta's keys live in the file: at the root, or under the adapter's prefix + site path."""
    if delta.state_at_root:
        return ""
    # PEFT's prompt-learning models save modules_to_save under "base_model." (no LoRA-style wrapper).
    return f"{type(model.peft_config[adapter_name]).state_prefix}{site.path}."


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """`base_model.model.<module path>.<PEFT param name>` -> tensor, with no adapter name inside."""
    model._check_name(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for site in model.sites():
        delta = site.deltas[adapter_name] if adapter_name in site.deltas else None
        if delta is None:
            continue
        prefix = _key_prefix(model, adapter_name, site, delta)
        for key, value in delta.export_state().items():
            out[f"{prefix}{key}"] = value
    if adapter_name in model.banks:
        out.update(bank_state(model.banks[adapter_name]))
    return out


def save_adapters(model, directory: str | Path, adapter_names: list[str] | None = None) -> None:
    """Save adapters; each folder is written to a temporary sibling then moved into place."""
    directory = Path(directory)
    for name in adapter_names or list(model.peft_config):
        target = directory if name == "default" else directory / name
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, name).items()}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.peft_config[name].save(tmp)
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            target.mkdir(parents=True, exist_ok=True)
            for fname in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(tmp / fname, target / fname)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def read_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a saved adapter's config and tensors, with errors that name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    config = AdapterConfig.load(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():  # safetensors wins; the legacy pickle is read only when it is alone
        legacy = directory / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            return config, _read_legacy(legacy)
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {directory}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"{path}: cannot read safetensors ({exc})") from None
    return config, tensors


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a legacy `adapter_model.bin`: torch.load with weights_only=True, so no pickled code
    runs; anything but a flat {str: Tensor} dict is refused, naming the file (keys and shapes are then
    checked as for safetensors)."""
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure of the restricted unpickler: not tensors only
        raise AdapterLoadError(f"{path}: cannot be read as a tensors-only legacy file (weights_only=True; "
                               f"nothing in it was run): {type(exc).__name__}: {exc}") from None
    bad = None if isinstance(data, dict) else type(data).__name__
    if bad is None:
        bad = next((f"{k!r}: {type(v).__name__}" for k, v in data.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        raise AdapterLoadError(f"{path}: expected a flat {{name: tensor}} dict, found {bad}")
    return data


def _owning_module(modules: set[str], key: str) -> str:
    """The longest path in `modules` that `key` starts with (else all but its last part)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return key.rsplit(".", 1)[0]


def _plan(model, adapter_name: str, tensors: dict[str, torch.Tensor]):
    """Map file keys to (delta, own key), checking every key and shape before anything is written."""
    problems: dict[str, list[str]] = defaultdict(list)
    plan = []
    expected: dict[str, tuple] = {}
    module_paths: set[str] | None = None
    for site in model.sites():
        if adapter_name not in site.deltas:
            continue
        delta = site.deltas[adapter_name]
        prefix = _key_prefix(model, adapter_name, site, delta)
        for key, value in delta.export_state().items():
            expected[f"{prefix}{key}"] = (site.path, delta, key, value)
    if adapter_name in model.banks:
        bank = model.banks[adapter_name]
        keys = bank_keys(bank)
        for file_key, value in bank_state(bank).items():
            expected[file_key] = ("bank", bank, keys[file_key], value)
    for file_key, tensor in tensors.items():
        if file_key not in expected:
            path = file_key[len(PREFIX):] if file_key.startswith(PREFIX) else file_key
            if module_paths is None:  # only needed to name the module of an unexpected key
                module_paths = {p for p, _ in logical_modules(model.base_model)}
            problems[_owning_module(module_paths, path)].append(f"unexpected key '{file_key}'")
            continue
        site_path, delta, key, value = expected.pop(file_key)
        if tuple(tensor.shape) != tuple(value.shape):
            problems[site_path].append(f"'{key}' has shape {tuple(tensor.shape)} in the file "
                                       f"but the model expects {tuple(value.shape)}")
            continue
        plan.append((delta, key, tensor))
    for site_path, delta, key, _ in expected.values():
        if site_path == "bank" or not delta.optional_state(key):
            problems[site_path].append(f"'{key}' is missing from the file")
    for owner in {id(d): d for d, _, _ in plan if isinstance(d, Bank)}.values():
        found = {key: tensor for d, key, tensor in plan if d is owner}
        for msg in owner.check_state(found):
            problems["bank"].append(msg)
    if problems:
        lines = [f"  {module}: {'; '.join(msgs)}" for module, msgs in sorted(problems.items())[:20]]
        more = f"\n  ... and {len(problems) - 20} more modules" if len(problems) > 20 else ""
        raise AdapterLoadError(f"adapter '{adapter_name}' does not fit this model:\n" + "\n".join(lines) + more)
    return plan


def load_tensors(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy file tensors into an existing adapter after validating all of them."""
    per_delta: dict[int, tuple] = {}
    for delta, key, tensor in _plan(model, adapter_name, tensors):
        per_delta.setdefault(id(delta), (delta, {}))[1][key] = tensor
    for owner, found in per_delta.values():
        if isinstance(owner, Delta):
            owner.import_state(found)
        else:  # the adapter's bank: a plain module, keys as in its state_dict
            owner.load_state_dict(found, strict=False)


def load_adapter(model, directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
    """Add adapter `adapter_name` from `directory` into an AdaptedModel, or leave it unchanged."""
    config, tensors = read_adapter(directory)
    config = config.replace(inference_mode=not is_trainable)
    model.add_adapter(adapter_name, config, calibration=LOADING)
    try:
        load_tensors(model, adapter_name, tensors)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def from_pretrained(cls, base_model, directory: str | Path, adapter_name: str, is_trainable: bool):
    """Build cls(base_model, config) from a saved adapter; on failure the base model is restored."""
    config, tensors = read_adapter(directory)
    if not isinstance(config, AdapterConfig):  # pragma: no cover - read_adapter guarantees it
        raise ConfigError(f"{directory}: not an adapter config")
    config = config.replace(inference_mode=not is_trainable)
    model = cls(base_model, config, adapter_name, calibration=LOADING)
    try:
        load_tensors(model, adapter_name, tensors)
    except Exception:
        model.unload()
        raise
    return model
