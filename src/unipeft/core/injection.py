"""Planning an injection: targets, the resolved frozen config, the bank and every delta, built before
the model is touched (so a failure anywhere leaves it unchanged)."""
from __future__ import annotations

from torch import nn

from . import layers
from .calibration import collect
from .config import AdapterConfig
from .errors import ConfigError, TargetError
from .registry import get_method, method_for_config
from .targets import logical_modules, name_matches, select_targets

SAVE_METHOD = "modules_to_save"


def plan_injection(base_model: nn.Module, config: AdapterConfig, calibration=None) -> tuple:
    """(frozen resolved config, [(path, module, delta)], bank or None, {path: base edits}) for adding
    `config` to `base_model`; every edit is checked to name a parameter of its module."""
    spec = method_for_config(config)
    targets = select_targets(base_model, config, spec.capabilities.layer_types, spec.default_targets)
    if not spec.capabilities.quantized_base:
        quantized = [p for p, m in targets if layers.is_quantized(m)]
        if quantized:
            raise TargetError(f"{type(config).__name__}: {spec.name} does not support quantized base layers, "
                              f"but '{quantized[0]}' is a {type(dict(targets)[quantized[0]]).__name__}; "
                              f"methods with quantized_base in up.capability_table() do")
    config = config.frozen_copy(**config.resolved_fields(base_model, targets))
    need = config.needs_calibration()
    stats = collect(base_model, targets, calibration, need, type(config).__name__) if need else {}
    bank = config.make_bank(base_model, targets)
    built = [(path, module, spec.delta_cls.create(module, config, path, bank, stats.get(path)))
             for path, module in targets]
    if config.modules_to_save:
        saver = get_method(SAVE_METHOD)
        found = [(p, m) for p, m in logical_modules(base_model) if name_matches(p, config.modules_to_save)]
        if not found:
            raise ConfigError(f"modules_to_save={config.modules_to_save!r} matched no module")
        found = [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found)]
        built += [(p, m, saver.delta_cls.create(m, config, p)) for p, m in found]
    edits = {path: edit for path, _, d in built if (edit := d.base_edits())}
    modules = {path: module for path, module, _ in built}
    for path, edit in edits.items():
        for name in edit:
            layers.check_writable(modules[path], name, path)
    return config, built, bank, edits
