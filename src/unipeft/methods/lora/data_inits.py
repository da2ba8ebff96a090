"""Data-aware LoRA inits: CorDA, EVA and LoRA-GA, all fed by core's one streaming calibration pass.

- CorDA ("corda", Yang et al., 2024): C = the calibration input covariance (per-call max-normalised,
  as PEFT estimates it), damped until invertible; SVD of W C = U S V^T, V' = (V^T C^-1)^T.
  `corda_method="ipm"` (instruction-previewed) puts the r largest components into the adapter,
  `"kpm"` (knowledge-preserved) the r smallest, so the dominant (pre-trained knowledge) ones stay
  frozen. A = sqrt(S/s) V'^T, B = U sqrt(S/s) (s = scaling); the base keeps W - s B A.
- EVA ("eva", Paischer et al., 2024): A = the top right singular vectors of the centred calibration
  inputs (= the top eigenvectors of their covariance, from the streamed Gram matrix), B = 0, base
  unchanged. Ranks are redistributed across layers by explained variance (`eva_config["rho"]`): each
  layer may take up to round(rho * r) components and the budget (the sum of the configured ranks)
  goes to the largest explained-variance ratios model-wide. `calibrated_fields` records the result
  in the adapter's config (rank_pattern / alpha_pattern; a layer given rank 0 leaves target_modules).
- LoRA-GA ("lora_ga", Wang et al., 2024): G = dL/dW averaged over the calibration batches;
  SVD G = U S V^T; A and B take 2r components split by `lora_ga_config["direction"]`, B is scaled by
  `scale`; the base keeps W - s B A so the output equals the base at init.

Differences from PEFT (exact algorithms where PEFT approximates): EVA computes the exact PCA of all
calibration rows in one pass (PEFT's incremental randomized PCA cycles the data until its components
converge to within `tau`; `tau` is accepted and recorded, it changes nothing here); like every
calibration statistic it skips padded positions (attention_mask == 0) but not label-masked ones
(`use_label_mask` is recorded only). LoRA-GA uses an exact SVD (PEFT: svd_lowrank with q = 4r), the
model in eval mode (no dropout noise in the gradient) and, for "stable" on GPT-2's Conv1D, the true
output width (PEFT reads the stored (in, out) shape). CorDA matches PEFT exactly (PEFT's hook takes one
unpadded sequence per call); its cache/covariance files are not supported (statistics come from the batches).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import torch

from ...core import layers
from ...core.errors import ConfigError, TargetError
from .inits import InitContext, InitResult, register_init

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}
CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}
LORA_GA_DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
SUB_CONFIGS = {"eva": ("eva_config", EVA_DEFAULTS), "corda": ("corda_config", CORDA_DEFAULTS),
               "lora_ga": ("lora_ga_config", LORA_GA_DEFAULTS)}


# ---- config validation (called from LoraConfig.validate) -------------------------------------------
def _bad(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"LoraConfig.{key}: expected {expected}, got {value!r}")


def check_sub_configs(config) -> None:
    """Validate eva_config / corda_config / lora_ga_config; fill PEFT's defaults for the chosen init."""
    for init, (name, defaults) in SUB_CONFIGS.items():
        value = getattr(config, name)
        if config.init != init:
            if value is not None:
                raise ConfigError(f"LoraConfig.{name}={value!r} is only used with init={init!r}, but "
                                  f"init={config.init!r}; drop {name} or set init={init!r}")
            continue
        if value is None:
            value = {}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. PEFT's EvaConfig object
            value = dataclasses.asdict(value)
        if not isinstance(value, dict) or set(value) - set(defaults):
            raise _bad(name, f"a dict with keys from {sorted(defaults)}", value)
        full = {**defaults, **value}
        _CHECKS[init](name, full)
        if full != getattr(config, name):
            setattr(config, name, full)  # a plain dict of every key, as PEFT stores the sub-config


def _check_eva(name: str, cfg: dict) -> None:
    if isinstance(cfg["rho"], bool) or not isinstance(cfg["rho"], (int, float)) or cfg["rho"] < 1:
        raise _bad(f"{name}['rho']", "a number >= 1", cfg["rho"])
    if isinstance(cfg["tau"], bool) or not isinstance(cfg["tau"], (int, float)) or not 0 <= cfg["tau"] <= 1:
        raise _bad(f"{name}['tau']", "a number in [0, 1]", cfg["tau"])
    for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(cfg[key], bool):
            raise _bad(f"{name}[{key!r}]", "true or false", cfg[key])


def _check_corda(name: str, cfg: dict) -> None:
    if cfg["corda_method"] not in ("ipm", "kpm"):
        raise _bad(f"{name}['corda_method']", "'ipm' or 'kpm'", cfg["corda_method"])
    for key in ("cache_file", "covariance_file"):
        if cfg[key] is not None:
            raise ConfigError(f"LoraConfig.{name}[{key!r}]={cfg[key]!r}: CorDA cache files are not supported; "
                              f"the statistics are computed from the calibration batches (leave it null)")
    for key in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
        if not isinstance(cfg[key], bool):
            raise _bad(f"{name}[{key!r}]", "true or false", cfg[key])


def _check_lora_ga(name: str, cfg: dict) -> None:
    if cfg["direction"] not in ("ArBr", "A2rBr", "ArB2r", "random"):
        raise _bad(f"{name}['direction']", "one of 'ArBr', 'A2rBr', 'ArB2r', 'random'", cfg["direction"])
    if cfg["scale"] not in ("stable", "weight_svd", "gd_scale", "unit"):
        raise _bad(f"{name}['scale']", "one of 'stable', 'weight_svd', 'gd_scale', 'unit'", cfg["scale"])
    gamma = cfg["stable_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        raise _bad(f"{name}['stable_gamma']", "a positive number", gamma)


_CHECKS = {"eva": _check_eva, "corda": _check_corda, "lora_ga": _check_lora_ga}


# ---- shared helpers ----------------------------------------------------------------------------------
def _stats(ctx: InitContext, kind: str):
    if ctx.calibration is None:
        labels = " with labels" if kind == "gradients" else ""
        raise ConfigError(f"LoraConfig.init={ctx.config.init!r} needs calibration data ({kind}): pass "
                          f"calibration=[batch, ...] (model inputs{labels}) to up.adapt / add_adapter, or set "
                          f"`calibration: {{batches: N}}` in the `unipeft train` run config; to load a saved "
                          f"adapter, wrap from_pretrained in unipeft.core.calibration.calibration_data(batches) "
                          f"(or calibration_data(BASE_HOLDS_RESIDUAL) on a base that already holds the residual)")
    return ctx.calibration


def _placeholder(ctx: InitContext) -> InitResult:
    """Zeros of the right shapes and no base edit: the adapter's tensors come from a file."""
    return InitResult(torch.zeros(ctx.a_shape), torch.zeros(ctx.b_shape))


def _matrix(ctx: InitContext, need: int, what: str) -> torch.Tensor:
    """The dense float32 (out, in) weight; ConfigError unless a matrix layer with min(out, in) >= need."""
    if len(ctx.a_shape) != 2:
        raise ConfigError(f"LoraConfig.init={ctx.config.init!r}: '{ctx.path}' is not a matrix layer "
                          f"({ctx.config.init} adapts Linear / Conv1D weights)")
    w = ctx.weight.to(torch.float32)
    if need > min(w.shape):
        raise ConfigError(f"LoraConfig.init={ctx.config.init!r}: {what} = {need} at '{ctx.path}' exceeds "
                          f"min(in, out) = {min(w.shape)} of its {tuple(w.shape)} weight; lower r / rank_pattern")
    return w


# ---- CorDA ------------------------------------------------------------------------------------------
def _damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + d I, its inverse) with d = damp * mean(diag C), damp doubled from 0.01 until the inverse is
    accurate (|| (C + dI)(C + dI)^-1 - I || < 0.05), as CorDA regularises a rank-deficient covariance."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + eye * (torch.diag(cov).mean() * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damp *= 2


def _corda(ctx: InitContext) -> InitResult:
    stats = _stats(ctx, "activations")
    if stats.placeholder:
        return _placeholder(ctx)
    w = _matrix(ctx, ctx.r, "the rank")
    cov = stats.scaled_covariance()
    fixed, inv = _damped_inverse(cov)
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).T  # (in, k): right vectors mapped back through C^-1, so U S V'^T = W
    keep = slice(0, ctx.r) if ctx.config.corda_config["corda_method"] == "ipm" else slice(-ctx.r, None)
    scaling = ctx.config.scaling(ctx.path)
    root = (s[keep] / scaling).sqrt()
    a = v[:, keep].T * root[:, None]
    b = u[:, keep] * root
    residual = w - scaling * b @ a
    return InitResult(a, b, base_weight=residual.to(ctx.weight.dtype))


# ---- EVA --------------------------------------------------------------------------------------------
def _pca(stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components (k, in) by decreasing variance, variances (k,), explained-variance ratios (k,)), cached."""
    if "pca" not in stats.cache:
        var, vecs = torch.linalg.eigh(stats.covariance())
        var, vecs = var.flip(0).clamp_min(0), vecs.flip(1)
        ratio = var / var.sum().clamp_min(torch.finfo(var.dtype).tiny)
        stats.cache["pca"] = (vecs.T.float(), var, ratio.float())
    return stats.cache["pca"]


def _eva_limit(config, stats, path: str, in_features: int) -> int:
    """The most components layer `path` may take: round(rho * r), at most its width and its rows."""
    r, _ = config.rank_and_alpha(path)
    return min(round(config.eva_config["rho"] * r), in_features, max(stats.rows - 1, 1))


def calibrated_fields(config, stats: dict, targets: list) -> dict[str, Any]:
    """EVA's rank redistribution: {rank_pattern, alpha_pattern[, target_modules]} for the adapter's config."""
    if config.init != "eva" or not stats or any(s.placeholder for s in stats.values()):
        return {}
    ratios, budget, original = {}, 0, {}
    for path, module in targets:
        geo = layers.geometry(module)
        if not geo.is_matrix:
            raise TargetError(f"LoraConfig.init='eva': '{path}' is a {type(module).__name__}; EVA adapts "
                              f"Linear / Conv1D layers only (exclude it with exclude_modules)")
        original[path] = config.rank_and_alpha(path)
        budget += original[path][0]
        ratios[path] = _pca(stats[path])[2][:_eva_limit(config, stats[path], path, geo.in_features)]
    owners = [p for p, r in ratios.items() for _ in range(len(r))]
    order = torch.cat(list(ratios.values())).argsort(descending=True, stable=True)
    counts = Counter(owners[i] for i in order[:budget].tolist())
    rank_pattern, alpha_pattern = {}, {}
    for path, (r, alpha) in original.items():
        new = counts.get(path, 0)
        if new and config.eva_config["adjust_scaling_factors"] and new != r:
            alpha = alpha * new / r  # keep the learning-rate scale of each layer independent of its rank
        if new and new != config.r:
            rank_pattern[path] = new
        if new and alpha != config.alpha:
            alpha_pattern[path] = alpha
    changes: dict[str, Any] = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    kept = [p for p, _ in targets if counts.get(p, 0)]
    if len(kept) < len(targets):  # a layer with rank 0 gets no adapter (as PEFT drops it)
        changes["target_modules"] = kept
    return changes


def _eva(ctx: InitContext) -> InitResult:
    stats = _stats(ctx, "activations")
    if stats.placeholder:
        return _placeholder(ctx)
    _matrix(ctx, 1, "the rank")
    comps, var, _ = _pca(stats)
    limit = min(ctx.a_shape[1], max(stats.rows - 1, 1))
    if ctx.r > limit:
        raise ConfigError(f"LoraConfig.init='eva': rank {ctx.r} at '{ctx.path}' exceeds the {limit} principal "
                          f"directions its {stats.rows} calibration rows of width {ctx.a_shape[1]} give; "
                          f"lower r or give more calibration data")
    a = comps[:ctx.r].clone()
    if ctx.config.eva_config["whiten"]:  # divide by sqrt of the singular values of the centred data
        sing = (var[:ctx.r] * (stats.rows - 1)).sqrt().float()
        a = a / sing.sqrt().clamp_min(torch.finfo(a.dtype).tiny)[:, None]
    return InitResult(a, torch.zeros(ctx.b_shape))


# ---- LoRA-GA ----------------------------------------------------------------------------------------
def _lora_ga(ctx: InitContext) -> InitResult:
    stats = _stats(ctx, "gradients")
    if stats.placeholder:
        return _placeholder(ctx)
    r = ctx.r
    w = _matrix(ctx, 2 * r, "2 x rank (LoRA-GA uses 2r gradient directions)")
    cfg = ctx.config.lora_ga_config
    grad = stats.mean_gradient().to(torch.float32)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    if cfg["direction"] == "ArBr":  # A: odd components, B: even ones
        ia, ib = list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    elif cfg["direction"] == "A2rBr":
        ia, ib = list(range(r, 2 * r)), list(range(r))
    elif cfg["direction"] == "ArB2r":
        ia, ib = list(range(r)), list(range(r, 2 * r))
    else:  # "random": one random subset of the 2r components for both
        ia = ib = torch.randperm(2 * r)[:r].tolist()
    a = vh[ia]
    s_b = s[ib]
    b = u[:, ib] * s_b
    scaling = ctx.config.scaling(ctx.path)
    if cfg["scale"] == "stable":
        b = b * (w.shape[0] ** 0.25 / math.sqrt(cfg["stable_gamma"]))
    elif cfg["scale"] == "weight_svd":
        if s_b[0] > 0:
            b = b * (torch.linalg.matrix_norm(w, ord=2) / s_b[0])
    elif cfg["scale"] == "gd_scale":
        a, b = a / scaling, b / scaling
    dtype = ctx.weight.dtype
    a, b = a.to(dtype), b.to(dtype)  # the offset is computed from the adapter's own precision
    residual = w - scaling * (b.float() @ a.float())
    return InitResult(a, b, base_weight=residual.to(dtype))


register_init("corda", _corda, needs="activations")
register_init("eva", _eva, needs="activations", data_only_in_factors=True)
register_init("lora_ga", _lora_ga, needs="gradients")
