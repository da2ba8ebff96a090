"""Which modules a config selects: suffix lists, regexes, "all-linear", excludes and layers."""
from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .errors import TargetError
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
    """Return [(path, module)] selected by `config`, raising TargetError with the reason if none."""
    spec = config.target_modules
    modules = list(logical_modules(model))
    skip = set(config.modules_to_save or [])
    if spec is None:
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
    if not chosen:
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
    return chosen


def _is_linear(module: nn.Module) -> bool:
    return is_matrix_layer(module)
