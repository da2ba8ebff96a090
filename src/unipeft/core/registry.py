"""The method registry: name -> (config class, delta class, declared capabilities).

`register(...)` is the one call that adds a method: the capability table, the public names of
`unipeft` (`public_names()`), the invariant suite and the docs all read this table. The
registry imports no method: `import unipeft` imports unipeft.methods (and kg's calibrator),
whose modules register themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Capabilities:
    """What a method supports, declared once at registration; tests and docs read this table."""

    mergeable: bool
    mixed_batch: bool
    layer_types: tuple[type, ...]
    quantized_base: bool = False
    peft_compatible: bool = False  # PEFT itself has this method and reads our files


@dataclass(frozen=True)
class MethodSpec:
    """A registered method."""

    name: str
    config_cls: type
    delta_cls: type
    capabilities: Capabilities
    # predicate(path, module) for the modules used when config.target_modules is None
    default_targets: Callable[[str, nn.Module], bool] | None = None
    internal: bool = field(default=False)  # building block (e.g. modules_to_save), not user-facing
    # Other public helpers of the method (e.g. `fuse`), exported by `unipeft` under their names.
    exports: tuple[Any, ...] = ()
    # The method's registered strategies by kind, read when the table is built (LoRA: its inits and
    # variants), so one registered later shows up: () -> {"init": [...], "variant": [...]}.
    strategies: Callable[[], dict[str, list[str]]] | None = None


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, delta_cls: type, capabilities: Capabilities,
             default_targets: Callable[[str, nn.Module], bool] | None = None,
             internal: bool = False, exports: tuple[Any, ...] = (),
             strategies: Callable[[], dict[str, list[str]]] | None = None) -> MethodSpec:
    """Bind `name` to its config class, delta class and capabilities (the one edit that adds a method)."""
    old = _METHODS.get(name)
    if old is not None and (old.delta_cls is not delta_cls or old.config_cls is not config_cls):
        raise ValueError(f"method '{name}' is already registered")
    config_cls.method = name
    spec = MethodSpec(name, config_cls, delta_cls, capabilities, default_targets, internal, tuple(exports),
                      strategies)
    _METHODS[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests that register a temporary one)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> MethodSpec:
    """The spec registered under `name`; ConfigError listing the known names otherwise."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {sorted(public_methods())}")
    return _METHODS[name]


def method_for_config(config) -> MethodSpec:
    """The spec of a config instance."""
    return get_method(type(config).method)


def method_for_peft_type(peft_type: str) -> MethodSpec:
    """The spec whose config declares `peft_type` (PEFT's on-disk type string).

    Several methods may share one type (LoRA's training strategies write PEFT "LORA" folders): the
    one whose config class is the base of most of the others wins ("lora" over its subclasses
    "loraplus", "lora_fa"), ties going to the first registered, so the answer never depends on the
    order in which subclasses were imported."""
    found = [s for s in _METHODS.values() if s.config_cls.peft_type == peft_type and not s.internal]
    found = found or [s for s in _METHODS.values() if s.config_cls.peft_type == peft_type]
    if found:
        return max(found, key=lambda s: sum(issubclass(o.config_cls, s.config_cls) for o in found))
    known = sorted(s.config_cls.peft_type for s in _METHODS.values() if not s.internal)
    raise ConfigError(f"unknown peft_type '{peft_type}'; supported: {known}")


def public_methods() -> dict[str, MethodSpec]:
    """All user-facing registered methods, by name."""
    return {n: s for n, s in _METHODS.items() if not s.internal}


def public_names() -> dict[str, Any]:
    """What `unipeft` exports for the methods: each config class and each declared helper, by name."""
    out: dict[str, Any] = {}
    for spec in public_methods().values():
        for obj in (spec.config_cls, *spec.exports):
            out[obj.__name__] = obj
    return out


def capability_table() -> list[dict]:
    """One row per method: name, peft_type, its declared capabilities and registered strategies."""
    rows = []
    for name, spec in sorted(public_methods().items()):
        c = spec.capabilities
        rows.append({"method": name, "peft_type": spec.config_cls.peft_type, "mergeable": c.mergeable,
                     "mixed_batch": c.mixed_batch, "quantized_base": c.quantized_base,
                     "peft_compatible": c.peft_compatible,
                     "identity_at_init": spec.delta_cls.identity_at_init,
                     "layer_types": [t.__name__ for t in c.layer_types],
                     "strategies": spec.strategies() if spec.strategies else {}})
    return rows
