"""Which modules a config selects: suffix lists, regexes, "all-linear", excludes and layers; and the
modules owning bare parameters a config targets (PEFT's target_parameters)."""
from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .errors import ConfigError, TargetError
from .layers import is_matrix_layer

def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (path, module) as in the un-adapted model: a site stands for its base layer."""
    from .site import AdaptedSite

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdaptedSite):
                yield path, child.base_layer
            else:
                yield path, child
                yield from walk(path, child)

    yield from walk("", model)


def name_matches(path: str, spec: list[str] | str) -> bool:
    """List: exact or suffix match on a '.' boundary; str: regex fullmatch."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == key or path.endswith("." + key) for key in spec)


def layer_index(path: str, patterns: list[str] | str | None) -> int | None:
    """The layer index in `path` (e.g. 3 in 'encoder.layer.3.attention'), matched as PEFT does."""
    if patterns is None:
        # No pattern: the first numeric component after a dotted prefix.
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return int(match.group(1)) if match else None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output embedding (LM head), which "all-linear" never selects."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {path for path, module in logical_modules(model) if module is head}


def pattern_key(patterns: dict, path: str) -> str | None:
    """The key of a rank/alpha pattern dict that selects `path` (suffix on a '.' boundary or regex)."""
    for key in patterns:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return key
    return None


def select_targets(model: nn.Module, config, supported: tuple[type, ...],
                   default_targets=None) -> list[tuple[str, nn.Module]]:
    """Return [(path, module)] selected by `config`, raising TargetError with the reason if none; then
    the modules owning the parameters a config's `target_parameters` names (see `parameter_owners`)."""
    spec = config.target_modules
    modules = list(logical_modules(model))
    skip = set(config.modules_to_save or [])
    if spec is None and parameter_spec(config):
        chosen, implicit = [], False  # only bare parameters are targeted (target_parameters)
    elif spec is None:
        if default_targets is None:
            raise TargetError(f"{type(config).__name__}.target_modules is required for this model "
                              f"(e.g. a list of module names such as ['query', 'value'], or 'all-linear')")
        chosen = [(p, m) for p, m in modules if default_targets(p, m)]
        implicit = True
    elif spec == "all-linear":
        heads = output_head_names(model)
        chosen = [(p, m) for p, m in modules if _is_linear(m) and p not in heads]
        implicit = True
    else:
        chosen = [(p, m) for p, m in modules if name_matches(p, spec)]
        implicit = False
    chosen = [(p, m) for p, m in chosen if not name_matches(p, list(skip))]
    if config.exclude_modules:
        chosen = [(p, m) for p, m in chosen if not name_matches(p, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [(p, m) for p, m in chosen if layer_index(p, config.layers_pattern) in wanted]
    if implicit:
        chosen = [(p, m) for p, m in chosen if isinstance(m, supported)]
    params = parameter_spec(config)
    if not chosen and not params:
        sample = ", ".join(p for p, _ in modules[:12])
        what = "the method's default targets" if spec is None else f"target_modules={spec!r}"
        raise TargetError(f"{type(config).__name__}: {what} matched no module of "
                          f"{type(model).__name__} (after exclude_modules/layers_to_transform); "
                          f"module names look like: {sample}")
    for path, module in chosen:
        if not isinstance(module, supported):
            names = ", ".join(t.__name__ for t in supported)
            raise TargetError(f"{type(config).__name__}: module '{path}' is a {type(module).__name__}, "
                              f"which {config.method} does not support (supported: {names})")
    return chosen + parameter_owners(modules, config, chosen) if params else chosen


# ---- bare parameters (PEFT's target_parameters) ---------------------------------------------
def parameter_spec(config) -> list[str]:
    """The bare parameters the config targets (`AdapterConfig.parameter_targets`)."""
    return list(config.parameter_targets())


def matched_parameters(path: str, module: nn.Module, names: list[str] | None) -> list[str]:
    """`module`'s own parameters (declaration order) whose '<path>.<name>' equals or ends with '.<entry>' of `names`."""
    keys = [(n, f"{path}.{n}" if path else n) for n, _ in module.named_parameters(recurse=False)]
    return [n for n, key in keys if any(key == t or key.endswith("." + t) for t in names or [])]


def parameter_owners(modules: list[tuple[str, nn.Module]], config,
                     chosen: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The modules owning a parameter `config.target_parameters` names: each becomes a site whose delta
    changes that parameter. ConfigError for an entry matching nothing, or an owner that is (or nests
    with) a module already targeted by target_modules."""
    names, owner = parameter_spec(config), type(config).__name__
    found = [(p, m) for p, m in modules if matched_parameters(p, m, names)]
    for name in names:
        if not any(matched_parameters(p, m, [name]) for p, m in found):
            params = [(f"{p}.{n}", t.ndim) for p, m in modules for n, t in m.named_parameters(recurse=False)]
            sample = ", ".join(k for k, _ in sorted(params, key=lambda kv: -kv[1])[:6])
            raise ConfigError(f"{owner}.target_parameters: {name!r} matched no parameter of the model (an entry "
                              f"matches '<module path>.<parameter name>' or a '.'-suffix of it); parameter names "
                              f"look like: {sample}")
    for path, _ in found:
        clash = [q for q, _ in chosen if q == path or q.startswith(path + ".") or path.startswith(q + ".")]
        if clash:
            raise ConfigError(f"{owner}.target_parameters: '{path}' owns a targeted parameter but '{clash[0]}' is "
                              f"also selected by target_modules; target a module either way, not both")
    return found


def _is_linear(module: nn.Module) -> bool:
    return is_matrix_layer(module)
