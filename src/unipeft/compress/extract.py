"""LoRA extraction: a full fine-tune's task vector, truncated per layer by SVD, as a PEFT-format LoRA folder.

For every selected layer with weight W: the task vector D = W_tuned - W_base (an Embedding's transposed,
(dim, num) as PEFT's lora_embedding_B @ lora_embedding_A), its SVD D = U S V^T in float64, and the rank-r
factors B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, so B @ A is the best rank-r approximation of D (Eckart-Young:
||D - B A||_F^2 = sum of the discarded S_i^2). The folder's config has lora_alpha = r (scaling 1), the
selected layers (Linear, GPT-2's Conv1D with fan_in_fan_out, optionally Embedding) as an exact regex in
target_modules, and rank_pattern/alpha_pattern for layers that get a smaller rank (a thin matrix, or
`min_fro_fraction` reached earlier). Layers with a zero task vector are skipped. Biases and other
parameters are not extracted: the summary lists the ones that changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.config import CONFIG_NAME
from ..core.errors import ConfigError
from ..core.layers import geometry, is_matrix_layer, is_quantized
from ..core.registry import get_method
from ..core.state import PREFIX, WEIGHTS_NAME
from ..core.targets import name_matches


def _check(rank, min_fro_fraction) -> None:
    """ConfigError naming the argument for a bad rank or energy fraction."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"extract_lora: rank must be a positive integer, got {rank!r}")
    if min_fro_fraction is not None and (isinstance(min_fro_fraction, bool)
                                         or not isinstance(min_fro_fraction, (int, float))
                                         or not 0 < min_fro_fraction <= 1):
        raise ConfigError(f"extract_lora: min_fro_fraction must be None or a number in (0, 1], "
                          f"got {min_fro_fraction!r}")


def _folder_state(folder: Path, arg: str) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model folder (model.safetensors, or its sharded index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(folder / shard)))
        return out
    raise ConfigError(f"extract_lora: {arg}={str(folder)!r} has no model.safetensors (or its index)")


def _skeleton(folder: Path, arg: str) -> nn.Module:
    """The model class of a folder's config.json, built on the meta device (module layout only)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"extract_lora: {arg}={str(folder)!r}: cannot read config.json ({exc})") from None
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ConfigError(f"extract_lora: {arg}={str(folder)!r}: config.json names no known architecture ({arch!r})")
    with torch.device("meta"):
        return cls(config)


def _resolve(model, arg: str) -> tuple[nn.Module | None, dict[str, torch.Tensor], str | None]:
    """(module or None, state dict, folder path or None) of an nn.Module or a model folder."""
    if isinstance(model, nn.Module):
        return model, {k: v.detach() for k, v in model.state_dict().items()}, None
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        return None, _folder_state(Path(model), arg), str(model)
    raise ConfigError(f"extract_lora: {arg} must be an nn.Module or a model folder, got {model!r}")


def _layers(module: nn.Module, target_modules, include_embeddings: bool) -> list[tuple[str, str]]:
    """(path, "linear" | "transposed" | "embedding") of the layers to extract, in module order."""
    out = []
    for path, child in module.named_modules():
        if is_matrix_layer(child) and not is_quantized(child):
            kind = geometry(child).kind  # "transposed": GPT-2's Conv1D stores (in, out)
        elif isinstance(child, nn.Embedding):
            kind = "embedding"
        else:
            continue
        if target_modules is not None:
            if name_matches(path, target_modules):
                out.append((path, kind))
        elif kind != "embedding" or include_embeddings:
            out.append((path, kind))
    return out


def _rank_for(s: torch.Tensor, rank: int, min_fro_fraction: float | None) -> int:
    """The rank kept: `rank` (at most the matrix's), or fewer once min_fro_fraction of ||D||_F^2 is reached."""
    r = min(rank, s.numel())
    if min_fro_fraction is not None:
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        reached = int(torch.searchsorted(energy, torch.tensor(min_fro_fraction, dtype=energy.dtype) - 1e-12)) + 1
        r = min(r, reached)
    return r


def factorize(task: torch.Tensor, rank: int, min_fro_fraction: float | None = None):
    """(B, A, kept rank, singular values) of the best rank-r approximation B @ A of a 2-D task vector."""
    u, s, vh = torch.linalg.svd(task.double(), full_matrices=False)
    r = _rank_for(s, rank, min_fro_fraction)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], r, s


def _changed_others(base_sd: dict, tuned_sd: dict, extracted: set[str]) -> list[str]:
    """Keys present in both states, not extracted, whose values differ (biases, norms, skipped layers)."""
    return sorted(k for k in base_sd.keys() & tuned_sd.keys() if k not in extracted
                  and base_sd[k].shape == tuned_sd[k].shape and not torch.equal(base_sd[k], tuned_sd[k]))


def extract_lora(base, tuned, out_dir: str | Path, rank: int, target_modules: list[str] | str | None = None,
                 min_fro_fraction: float | None = None, include_embeddings: bool = False,
                 progress: bool = True) -> dict:
    """Write the rank-`rank` LoRA of `tuned - base` (modules or model folders) to `out_dir`; return a summary."""
    _check(rank, min_fro_fraction)
    base_mod, base_sd, base_path = _resolve(base, "base")
    tuned_mod, tuned_sd, _ = _resolve(tuned, "tuned")
    skeleton = base_mod or tuned_mod or _skeleton(Path(base_path), "base")
    layers = _layers(skeleton, target_modules, include_embeddings)
    if not layers:
        raise ConfigError(f"extract_lora: target_modules={target_modules!r} selects no Linear/Embedding layer")
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for path, kind in tqdm(layers, desc="extract_lora", unit="layer", disable=not progress):
        key = f"{path}.weight"
        if key not in base_sd or key not in tuned_sd:
            skipped[path] = "weight not in both states (tied to another layer?)"
            continue
        wb, wt = base_sd[key], tuned_sd[key]
        if wb.shape != wt.shape:
            raise ConfigError(f"extract_lora: layer '{path}' has shape {tuple(wb.shape)} in base but "
                              f"{tuple(wt.shape)} in tuned")
        task = wt.double() - wb.double()
        if kind in ("embedding", "transposed"):
            task = task.T  # to (out, in); PEFT's embedding delta is (lora_embedding_B @ lora_embedding_A).T
        if not bool(task.any()):
            skipped[path] = "zero task vector"
            continue
        b, a, r, s = factorize(task, rank, min_fro_fraction)
        b, a = b.to(wb.dtype).contiguous(), a.to(wb.dtype).contiguous()
        names = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{path}.{names[0]}"], tensors[f"{PREFIX}{path}.{names[1]}"] = a, b
        ranks[path] = r
        error = float((task - b.double() @ a.double()).norm())
        norm = float(task.norm())
        per_layer[path] = {"kind": kind, "rank": r, "fro_error": error, "rel_error": error / norm,
                           "optimal_fro_error": float(s[r:].pow(2).sum().sqrt()), "params": a.numel() + b.numel()}
    if not tensors:
        raise ConfigError(f"extract_lora: every selected layer has a zero task vector or is missing: {skipped}")
    pattern = {p: r for p, r in ranks.items() if r != rank}
    config = get_method("lora").config_cls(
        r=rank, alpha=rank, target_modules="(" + "|".join(re.escape(p) for p in ranks) + ")",
        rank_pattern=pattern, alpha_pattern={p: float(r) for p, r in pattern.items()},
        base_model_name_or_path=base_path, fan_in_fan_out=any(per_layer[p]["kind"] == "transposed" for p in ranks))
    _write(Path(out_dir), config, tensors)
    extracted = {f"{p}.weight" for p in ranks}
    return {"layers": per_layer, "skipped": skipped, "rank": rank,
            "total_params": sum(v["params"] for v in per_layer.values()),
            "bytes": (Path(out_dir) / WEIGHTS_NAME).stat().st_size,
            "payload_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "changed_not_extracted": _changed_others(base_sd, tuned_sd, extracted)}


def _write(out_dir: Path, config, tensors: dict[str, torch.Tensor]) -> None:
    """Write the folder into a temporary sibling, then move it (or its files) into place."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"extract_lora: out_dir={str(out_dir)!r} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if not out_dir.exists():
            os.rename(tmp, out_dir)
        else:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

