"""PEFT's `add_weighted_adapter` for LoRA adapters, on the adapter merges of adapters.py.

What it computes, per combination type (s_i: source i's LoRA scaling at the site, w_i its weight; the
new adapter has r = new rank and alpha = r, so its scaling is 1 without rsLoRA):
- linear, ties, dare_linear, dare_ties, magnitude_prune: the operator runs on the A factors with
  weights sign(w_i s_i) sqrt(|w_i s_i|) and on the B factors with sqrt(|w_i s_i|) (the sign on one side
  only); all sources need the same rank;
- cat: A = [w_1 s_1 A_1; ...], B = [B_1 ... B_K], rank = the sum of the ranks;
- svd and the *_svd forms: the operator runs on each site's dense deltas (scaling included) and the
  result's top-r singular factors are written (B = U S, A = Vh), r = svd_rank or the largest source rank.
The new config is the first source's with r, alpha, target_modules (the union, or the regexes joined
with '|') and empty rank/alpha patterns replaced. A single source always merges "linear".
Random (dare) masks come from the global RNG in PEFT's order (after the new adapter's init, whose draws
match PEFT's; then layer by layer, A then B, source by source), so the same torch.manual_seed gives
PEFT's result.
Unlike PEFT, the new adapter's init is the default one (its tensors are overwritten anyway, and a
weight-editing init would change the base), and with rsLoRA the factors are divided by the new
scaling so the merged delta is the same as without it.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..core.errors import ConfigError, MergeError
from . import adapters, ops

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _lora_sources(model, names: list[str]) -> list:
    """The sources' configs; MergeError unless each is a plain LoRA adapter on modules."""
    lora_cls = adapters.get_method("lora").config_cls
    configs = []
    for n in names:
        cfg = model.peft_config[n]
        if not isinstance(cfg, lora_cls):
            raise MergeError(f"adapters: add_weighted_adapter merges LoRA adapters; {n!r} is {type(cfg).method} "
                             f"(use unipeft.merge.merge_adapters(method='svd') for other methods)")
        if cfg.use_dora or cfg.target_parameters:
            what = "DoRA" if cfg.use_dora else "target_parameters"
            raise MergeError(f"adapters: add_weighted_adapter does not support {what} (adapter {n!r})")
        configs.append(cfg)
    return configs


def _new_rank(configs: list, combination_type: str, svd_rank: int | None) -> int:
    """PEFT's rank of the merged adapter; MergeError when the factor types meet unequal ranks."""
    ranks = [adapters.source_rank(c) for c in configs]
    if combination_type in _FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise MergeError(f"adapters: combination_type {combination_type!r} needs adapters of one rank, "
                             f"got ranks {ranks} (use 'cat' or an '_svd' type)")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _new_targets(configs: list):
    """PEFT's target_modules of the merged adapter: the union of the lists, or the regexes joined by '|'."""
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) != 1:
        raise MergeError("adapters: the target_modules of the adapters mix lists and regex strings; "
                         "PEFT cannot combine those either")
    if kinds == {str}:
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted(set().union(*(c.target_modules or [] for c in configs)))


def _factor_weights(configs: dict, weights: dict[str, float], new_scaling):
    """weight_at giving A factors sign(w s) sqrt(|w s|) and B factors sqrt(|w s|) (s / new scaling)."""
    def weight_at(where: str, key: str, present: list[str]) -> list[float]:
        out = []
        for name in present:
            ws = weights[name] * configs[name].scaling(where) / new_scaling(where)
            root = math.sqrt(abs(ws))
            out.append(root * (1 if ws >= 0 else -1) if "_A" in key else root)
        return out
    return weight_at


def _merge_factors(model, sources: list[str], name: str, combination_type: str, params: dict, weight_at,
                   config) -> None:
    """The factor types: the operator on each site's A factors, then its B factors, of present sources."""
    sites: dict[str, dict] = {}
    for s in sources:
        for d in model.deltas(s):
            adapters._pair(d)
            sites.setdefault(d.path, {})[s] = d
    for where, by_source in sites.items():
        shapes = {s: [tuple(p.shape) for _, p in d.named_parameters()] for s, d in by_source.items()}
        if len({tuple(v) for v in shapes.values()}) != 1:
            raise MergeError(f"adapters: at {where!r} the LoRA factors have different shapes {shapes}")
    combine = ops.operator(combination_type, params, None)  # None: the global RNG, as PEFT draws

    def write() -> None:
        for where in adapters._site_order(model, sites):
            by_source = sites[where]
            present = [s for s in sources if s in by_source]
            delta = model.delta_at(name, where)
            for key, param in delta.named_parameters():  # A before B, as PEFT merges them
                tensors = [dict(by_source[s].named_parameters())[key].detach() for s in present]
                merged = combine(tensors, weight_at(where, key, present))
                if not torch.isfinite(merged).all():
                    raise MergeError(f"combination_type {combination_type!r}: the merged {key!r} at {where!r} "
                                     f"is not finite")
                param.copy_(merged.to(param.dtype))

    adapters._build(model, name, config, write, keep_rng=False)


def add_weighted_adapter(model, adapters_: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """PEFT's LoraModel.add_weighted_adapter: add `adapter_name` merged from LoRA adapters `adapters_`.

    As in PEFT, an existing `adapter_name` leaves the model as it is (with a warning here); svd_driver
    only selects a CUDA solver in PEFT and is accepted and ignored. Bad input raises ConfigError or
    MergeError with the model unchanged.
    """
    if adapter_name in model.peft_config:
        warnings.warn(f"add_weighted_adapter: an adapter named {adapter_name!r} exists; nothing was added",
                      stacklevel=2)
        return
    adapters.check_sources(model, adapters_)
    sources = list(adapters_)
    weights = adapters._check_weights(weights, len(sources), "weights")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type: expected one of {list(COMBINATION_TYPES)}, got {combination_type!r}")
    if len(sources) == 1:
        combination_type = "linear"
    configs = _lora_sources(model, sources)
    rank = _new_rank(configs, combination_type, svd_rank)
    first = configs[0]
    lora_cls = type(first)
    default_init = lora_cls.__dataclass_fields__["init"].default
    config = first.replace(r=rank, alpha=rank, target_modules=_new_targets(configs), rank_pattern={},
                           alpha_pattern={}, init=default_init)
    op = adapters.operator_of(combination_type)
    given = {"density": density, "majority_sign_method": majority_sign_method}
    given = {k: v for k, v in given.items() if k in ops.OPERATOR_PARAMS[op]}
    extra = {}
    if combination_type.endswith("svd"):
        extra = adapters._SVD_PARAMS
        given.update(svd_rank=rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices)
    params = ops.check_params(op, given, extra, combination_type)
    by_name = dict(zip(sources, weights))
    plain = adapters.site_weights(sources, weights, None)
    if combination_type == "cat":
        adapters._merge_cat(model, sources, adapter_name, plain, config, same_config=False)
    elif combination_type in _FACTOR_TYPES:
        cfgs = dict(zip(sources, configs))
        _merge_factors(model, sources, adapter_name, combination_type, params,
                       _factor_weights(cfgs, by_name, config.scaling), config)
    else:
        adapters.merge_weights(model, sources, adapter_name, combination_type, params, plain, config, keep_rng=False)
