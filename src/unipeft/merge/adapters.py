"""Adapter-level merges: a new adapter of a model made from existing ones, by any operator of ops.py.

Two families, each written once for every operator:
- parameter space (linear, ties, dare_linear, dare_ties, magnitude_prune, pcb; cat for LoRA pairs): the
  sources (one method, one config) are combined tensor by tensor into a new adapter of that method and
  config;
- weight space (svd and the *_svd forms): each site's dense delta_weight() of every source that has
  the site is combined, and the result is written as a LoRA adapter through its best rank-r factors, so
  adapters of any mergeable method (IA3, LoHa, ...) become one LoRA.
Every check runs before the model changes; a failure while writing deletes the half-built adapter, so
a refused merge leaves the model exactly as it was. The new adapter is not activated.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

from ..core.calibration import LOADING
from ..core.errors import ConfigError, MergeError, TargetError
from ..core.registry import get_method, method_for_config
from . import ops

PARAMETER_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "pcb", "cat")
WEIGHT_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "pcb_svd")
METHODS = PARAMETER_METHODS + WEIGHT_METHODS

_SVD_PARAMS = {"svd_rank": None, "svd_clamp": None, "svd_full_matrices": True}
_FREE_FIELDS = ("inference_mode",)          # fields the sources may differ in
_CAT_FREE = ("r", "lora_alpha", "rank_pattern", "alpha_pattern")  # cat changes these (PEFT key names)
_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))

# weight_at(where, parameter name, present sources) -> one weight per present source
WeightFn = Callable[[str, str, list[str]], list[float]]


def operator_of(method: str) -> str:
    """The tensor operator a merge method applies ("svd" is the linear sum; "x_svd" is x)."""
    return "linear" if method == "svd" else method.removesuffix("_svd")


def check_params(method: str, params: dict) -> dict:
    """The method's full parameter dict (defaults filled in); ConfigError naming any bad or unknown one."""
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return ops.check_params(operator_of(method), params, _SVD_PARAMS if method in WEIGHT_METHODS else {},
                            method)


# ---- checks -----------------------------------------------------------------------------------

def check_sources(model, sources: Sequence[str]) -> None:
    """ConfigError unless `sources` is a non-empty list of adapter names of `model`."""
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise ConfigError(f"sources: expected a non-empty list of adapter names, got {sources!r}")
    for s in sources:
        if not isinstance(s, str) or s not in model.peft_config:
            raise ConfigError(f"sources: {s!r} is not an adapter of this model; adapters: {sorted(model.peft_config)}")
    if len(set(sources)) != len(sources):
        raise ConfigError(f"sources: {list(sources)} name an adapter more than once; give it one weight instead")


def check_new_name(model, name: str | None, base: str = "merged") -> str:
    """The new adapter's name (a free default when None); ConfigError if it is taken."""
    if name is None:
        name, i = base, 1
        while name in model.peft_config:
            name, i = f"{base}_{i}", i + 1
    elif name in model.peft_config:
        raise ConfigError(f"name: an adapter named {name!r} already exists; pick another name")
    return name


def parts(model, adapter: str) -> dict:
    """{site path: delta} of an adapter, plus {"bank": its shared module} when it has one."""
    out = {d.path: d for d in model.deltas(adapter)}
    if adapter in model.banks:
        out["bank"] = model.banks[adapter]
    return out


def _fields(model, adapter: str, free: tuple[str, ...] = ()) -> dict:
    data = model.peft_config[adapter].to_dict()
    return {k: v for k, v in data.items() if k not in _FREE_FIELDS + free}


def check_same(model, sources: Sequence[str], free: tuple[str, ...] = (), shapes: bool = True) -> None:
    """MergeError unless the sources share method, config (but `free`), sites, tensor shapes and buffers."""
    first = sources[0]
    method = type(model.peft_config[first]).method
    ref_fields, ref = _fields(model, first, free), parts(model, first)
    for s in sources[1:]:
        if type(model.peft_config[s]).method != method:
            raise MergeError(f"sources: parameter-space merges need one method; {first!r} is {method}, "
                             f"{s!r} is {type(model.peft_config[s]).method} (use method='svd' to merge into LoRA)")
        fields = _fields(model, s, free)
        diff = sorted(k for k in set(ref_fields) | set(fields) if ref_fields.get(k) != fields.get(k))
        if diff:
            raise MergeError(f"sources: {first!r} and {s!r} differ in config fields {diff}; parameter-space "
                             f"merges need one config")
        theirs = parts(model, s)
        if sorted(theirs) != sorted(ref):
            raise MergeError(f"sources: {first!r} sits at {sorted(ref)}, {s!r} at {sorted(theirs)}; they must "
                             f"cover the same modules")
        for where, mod in ref.items():
            other = theirs[where]
            pa = {k: (tuple(v.shape), v.dtype) for k, v in mod.named_parameters()}
            pb = {k: (tuple(v.shape), v.dtype) for k, v in other.named_parameters()}
            if shapes and pa != pb:
                raise MergeError(f"sources: at {where!r}, {first!r} has parameters {pa} but {s!r} has {pb}")
            ba, bb = fixed_state(mod), fixed_state(other)
            if sorted(ba) != sorted(bb) or not all(ba[k].shape == bb[k].shape and torch.equal(ba[k], bb[k])
                                                   for k in ba):
                raise MergeError(f"sources: at {where!r}, the fixed buffers {sorted(ba)} of {first!r} and {s!r} "
                                 f"differ; parameter-space merges need the same fixed state")


def fixed_state(module) -> dict[str, torch.Tensor]:
    params = {n for n, _ in module.named_parameters()}
    return {k: v for k, v in module.state_dict().items() if k not in params}


def _is_lora(config) -> bool:
    return isinstance(config, get_method("lora").config_cls)


def _pair(delta) -> tuple[str, str]:
    """The (A, B) parameter names of a plain LoRA delta; MergeError for anything else."""
    names = {n for n, _ in delta.named_parameters()}
    for a, b in _PAIRS:
        if names == {a, b}:
            return a, b
    raise MergeError(f"at {delta.path!r}: expected a plain LoRA pair {[list(p) for p in _PAIRS]}, "
                     f"got parameters {sorted(names)}")


def source_rank(config) -> int | None:
    """The largest rank of a LoRA config (rank_pattern included); None for other methods."""
    if not _is_lora(config):
        return None
    return max([config.r, *(config.rank_pattern or {}).values()])


# ---- building the new adapter -------------------------------------------------------------------

def _build(model, name: str, config, write: Callable[[], None], keep_rng: bool = True) -> None:
    """Add adapter `name` from `config`, then `write` its tensors; on any error the adapter is deleted
    again, so the model is as before. keep_rng: the init's draws (overwritten anyway) leave the global
    RNG as it was; False lets them advance it as PEFT's injection does before its random masks."""
    try:
        with torch.random.fork_rng(devices=[], enabled=keep_rng):
            model.add_adapter(name, config, calibration=LOADING)
    except TargetError as exc:
        raise MergeError(f"cannot build the merged adapter {name!r}: {exc}") from None
    try:
        with torch.no_grad():
            write()
    except BaseException:
        model.delete_adapter(name)
        raise


def _site_order(model, paths) -> list[str]:
    """`paths` in the order of the model's modules (the order PEFT visits layers; draws follow it)."""
    order = {p: i for i, (p, _) in enumerate(model.base_model.named_modules())}
    return sorted(paths, key=lambda p: order.get(p, len(order)))


def merge_parameters(model, sources: list[str], name: str, method: str, params: dict, weight_at: WeightFn,
                     config=None) -> str:
    """Parameter-space merge of same-method, same-config sources into `name` (config: the sources' own)."""
    if method == "cat":
        return _merge_cat(model, sources, name, weight_at, config)
    check_same(model, sources)
    generator = _generator(params)
    combine = ops.operator(operator_of(method), params, generator)
    new_config = config if config is not None else model.peft_config[sources[0]].replace()
    per_source = [parts(model, s) for s in sources]

    def write() -> None:
        target = parts(model, name)
        for where in _site_order(model, target):
            mod = target[where]
            src = [dict(p[where].named_parameters()) for p in per_source]
            for key, param in mod.named_parameters():
                merged = combine([sp[key].detach().float() for sp in src], weight_at(where, key, list(sources)))
                if not torch.isfinite(merged).all():
                    raise MergeError(f"method {method!r}: the merged {key!r} at {where!r} is not finite")
                param.copy_(merged.to(param.dtype))
            for key, value in fixed_state(per_source[0][where]).items():
                mod.get_buffer(key).copy_(value)

    _build(model, name, new_config, write)
    return name


def _merge_cat(model, sources, name, weight_at: WeightFn, config=None, same_config: bool = True) -> str:
    """LoRA pairs concatenated along the rank: B = [B_1 .. B_K], A = [w_1 s_1 A_1; ..] / s_new (a larger
    new rank keeps zeros in the rest). same_config=False lets the sources differ in any config field."""
    for s in sources:
        cfg = model.peft_config[s]
        if not _is_lora(cfg) or cfg.use_dora:
            raise MergeError(f"sources: method 'cat' needs plain LoRA adapters; {s!r} is "
                             f"{type(cfg).method}{' with DoRA' if _is_lora(cfg) and cfg.use_dora else ''}")
    if same_config:
        check_same(model, sources, free=_CAT_FREE, shapes=False)
    elif len({frozenset(d.path for d in model.deltas(s)) for s in sources}) != 1:
        raise MergeError(f"sources: {list(sources)} must cover the same modules for method 'cat'")
    per_source = [{d.path: d for d in model.deltas(s)} for s in sources]
    for parts in per_source:
        for d in parts.values():
            _pair(d)
    if config is None:
        ranks = {p: sum(model.peft_config[s].rank_and_alpha(p)[0] for s in sources) for p in per_source[0]}
        top = max(ranks.values())
        pattern = {re.escape(p): r for p, r in ranks.items() if r != top}
        config = model.peft_config[sources[0]].replace(r=top, alpha=top, rank_pattern=pattern,
                                                       alpha_pattern=dict(pattern))

    def write() -> None:
        new_cfg = model.peft_config[name]
        for where in _site_order(model, per_source[0]):
            delta = model.delta_at(name, where)
            a_key, b_key = _pair(delta)
            params = dict(delta.named_parameters())
            s_new = new_cfg.scaling(where)
            a_parts, b_parts = [], []
            for s, w, theirs in zip(sources, weight_at(where, a_key, list(sources)), per_source):
                src = dict(theirs[where].named_parameters())
                a_parts.append(src[a_key].detach() * w * model.peft_config[s].scaling(where) / s_new)
                b_parts.append(src[b_key].detach())
            a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
            extra = params[a_key].shape[0] - a.shape[0]
            if extra > 0:
                a = torch.cat([a, a.new_zeros((extra,) + tuple(a.shape[1:]))], dim=0)
                b = torch.cat([b, b.new_zeros((b.shape[0], extra) + tuple(b.shape[2:]))], dim=1)
            if a.shape != params[a_key].shape or b.shape != params[b_key].shape:
                raise MergeError(f"cat at {where!r}: the concatenated pair has shapes {tuple(a.shape)}, "
                                 f"{tuple(b.shape)}; the new adapter's are {tuple(params[a_key].shape)}, "
                                 f"{tuple(params[b_key].shape)} (its rank must be the sum of the sources')")
            params[a_key].copy_(a)
            params[b_key].copy_(b)

    _build(model, name, config, write)
    return name


def _generator(params: dict) -> torch.Generator | None:
    """A generator seeded with params['seed']; None (the global RNG) without a seed."""
    return None if params.get("seed") is None else torch.Generator().manual_seed(params["seed"])


def dense_deltas(model, sources: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{site path: {source: dense weight delta}} over every site of the sources, in model order."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for s in sources:
        spec = method_for_config(model.peft_config[s])
        if not spec.capabilities.mergeable:
            raise MergeError(f"sources: {s!r} uses {spec.name}, which is not mergeable (it has no weight-space "
                             f"delta), so a weight-space merge cannot use it")
        with torch.no_grad():
            for d in model.deltas(s):
                try:
                    dw = d.delta_weight()
                except MergeError as exc:
                    raise MergeError(f"sources: {s!r} at {d.path!r}: {exc}") from None
                extra = sorted(k for k, v in dw.items() if k != "weight" and bool(v.any()))
                if "weight" not in dw or extra:
                    raise MergeError(f"sources: {s!r} at {d.path!r} changes {sorted(dw)}; a LoRA holds only a "
                                     f"'weight' delta (non-zero {extra or ['no weight']})")
                site = found.setdefault(d.path, {})
                ref = next(iter(site.values()), None)
                if ref is not None and ref.shape != dw["weight"].shape:
                    raise MergeError(f"sources: at {d.path!r}, {s!r}'s delta has shape {tuple(dw['weight'].shape)}, "
                                     f"another source's {tuple(ref.shape)}")
                site[s] = dw["weight"].detach().float()
    return {p: found[p] for p in _site_order(model, found)}


def merge_weights(model, sources: list[str], name: str, method: str, params: dict, weight_at: WeightFn,
                  config=None, keep_rng: bool = True) -> str:
    """Weight-space merge: combine each site's dense deltas, write the best rank-r LoRA of the result."""
    deltas = dense_deltas(model, sources)
    if not deltas:
        raise MergeError(f"sources: {list(sources)} have no sites with a weight delta")
    combine = ops.operator(operator_of(method), params, _generator(params))
    if config is None:
        ranks = [source_rank(model.peft_config[s]) for s in sources]
        rank = params["svd_rank"] or (max(ranks) if all(r is not None for r in ranks) else 8)
        first = model.peft_config[sources[0]]
        config = get_method("lora").config_cls(r=rank, alpha=rank, target_modules="|".join(f"(?:{re.escape(p)})"
                                                                                    for p in deltas),
                                        dropout=first.dropout if _is_lora(first) else 0.0)

    def write() -> None:  # random masks are drawn here, after the new adapter exists (PEFT's order)
        for where, by_source in deltas.items():
            present = [s for s in sources if s in by_source]
            merged = combine([by_source[s] for s in present], weight_at(where, "weight", present))
            if not torch.isfinite(merged).all():
                raise MergeError(f"method {method!r}: the merged delta at {where!r} is not finite")
            write_lora(model.delta_at(name, where), merged, params["svd_clamp"], params["svd_full_matrices"])

    _build(model, name, config, write, keep_rng)
    return name


def _orientation(delta, a_key: str, b_key: str):
    """(to_matrix, scaling): how this LoRA delta's dense weight relates to B @ A (found by one probe)."""
    params = dict(delta.named_parameters())
    a, b = params[a_key], params[b_key]
    g = torch.Generator().manual_seed(0)
    a.copy_(torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype))
    b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
    rank = a.shape[0]
    prod = (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).double()
    probe = delta.delta_weight()["weight"].double()
    shapes = {"reshape": (lambda d: d.reshape(prod.shape)) if probe.numel() == prod.numel() else None,
              "transpose": (lambda d: d.T) if probe.dim() == 2 and probe.T.shape == prod.shape else None}
    for fn in shapes.values():
        if fn is None:
            continue
        m = fn(probe)
        s = float((m * prod).sum() / (prod * prod).sum())
        if s != 0 and torch.linalg.norm(m - s * prod) <= 1e-4 * torch.linalg.norm(m):
            return fn, s
    raise MergeError(f"at {delta.path!r}: the LoRA delta is not a scaled B @ A, cannot write a dense delta into it")


def write_lora(delta, dense: torch.Tensor, clamp: float | None = None, full_matrices: bool = True) -> None:
    """Set a LoRA delta's A and B to the best rank-r factors of `dense` (its base parameter's layout)."""
    a_key, b_key = _pair(delta)
    to_matrix, scaling = _orientation(delta, a_key, b_key)
    params = dict(delta.named_parameters())
    a, b = params[a_key], params[b_key]
    matrix = to_matrix(dense.float())
    if scaling != 1.0:
        matrix = matrix / scaling
    new_b, new_a = ops.svd_truncate(matrix, a.shape[0], clamp, full_matrices)
    a.copy_(new_a.reshape(a.shape).to(a.dtype))
    b.copy_(new_b.reshape(b.shape).to(b.dtype))


# ---- the public entry point -----------------------------------------------------------------------

def _check_weights(weights, n: int, field: str) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
        raise ConfigError(f"{field}: expected one weight per source ({n}), got {weights!r}")
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ConfigError(f"{field}: expected finite numbers, got {weights!r}")
    return [float(w) for w in weights]


def site_weights(sources: list[str], weights: list[float], layer_weights: dict | None) -> WeightFn:
    """weight_at for `weights`, overridden at sites whose path matches a layer_weights key (first match)."""
    if layer_weights is not None and not isinstance(layer_weights, dict):
        raise ConfigError(f"layer_weights: expected a dict {{regex: weights}}, got {layer_weights!r}")
    rules = []
    for pattern, values in (layer_weights or {}).items():
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"layer_weights: key {pattern!r} is not a valid regex ({exc})") from None
        rules.append((compiled, _check_weights(values, len(sources), f"layer_weights[{pattern!r}]")))
    index = {s: i for i, s in enumerate(sources)}

    def weight_at(where: str, key: str, present: list[str]) -> list[float]:
        chosen = next((v for rx, v in rules if rx.search(where)), weights)
        return [chosen[index[s]] for s in present]

    return weight_at


def merge_adapters(model, sources: list[str], weights: list[float] | None = None, method: str = "linear",
                   name: str | None = None, layer_weights: dict[str, list[float]] | None = None,
                   **params) -> str:
    """Add a new adapter to `model` merged from adapters `sources` by `method`; returns its name.

    `weights`: one per source; default 1/K each for linear, cat and svd (the average), 1 each otherwise.
    `layer_weights`: {regex searched in the site path: weights} overriding `weights` where it matches.
    Parameters by operator: linear normalize=False; ties density, majority_sign_method="total",
    divisor="count"|"weights"; dare_linear density, rescale=True, seed=None (None: global RNG);
    dare_ties both sets; magnitude_prune density; pcb ratio, min_ratio=1e-4, max_ratio=1e-4; the *_svd
    forms also svd_rank (default: the largest source LoRA rank, 8 for other methods), svd_clamp,
    svd_full_matrices. Bad input raises ConfigError / MergeError and leaves the model unchanged.
    """
    check_sources(model, sources)
    sources = list(sources)
    params = check_params(method, params)
    if weights is None:
        k = len(sources)
        weights = [1.0 / k] * k if method in ("linear", "cat", "svd") else [1.0] * k
    weights = _check_weights(weights, len(sources), "weights")
    weight_at = site_weights(sources, weights, layer_weights)
    name = check_new_name(model, name)
    build = merge_weights if method in WEIGHT_METHODS else merge_parameters
    return build(model, sources, name, method, params, weight_at)
