"""Planning an injection: targets, the resolved frozen config, the bank and every delta, built before
the model is touched (so a failure anywhere leaves it unchanged).

Order: select targets -> resolve the config against the model -> (data-aware inits) one streaming
calibration pass over the batches (core/calibration.py) -> `config.calibrated_fields(stats, targets)`
(fields the data decides, e.g. per-layer ranks) -> bank and deltas from that final frozen config."""
from __future__ import annotations

from torch import nn

from . import layers
from .calibration import BASE_HOLDS_RESIDUAL, LOADING, TargetStats, collect, scoped_calibration
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
    stats = {}
    loading = calibration is LOADING
    if calibration is None or loading:
        calibration = scoped_calibration()
    # Loading an init whose data only shaped the saved tensors (EVA): the file's ranks and tensors stand.
    shapes_only = calibration is BASE_HOLDS_RESIDUAL or (loading and config.loads_without_calibration())
    if need and shapes_only:  # tensors come from a file: shapes only, no edits
        stats = {path: TargetStats(placeholder=True) for path, _ in targets}
    elif need and calibration is not None:  # without data the method's init raises, naming itself
        stats = collect(base_model, targets, calibration, need, type(config).__name__)
        changes = config.calibrated_fields(stats, targets)
        if changes:  # e.g. EVA's redistributed ranks: recorded in the adapter's copy of the config
            config = config.frozen_copy(**changes)
            if {"target_modules", "exclude_modules"} & set(changes):  # a target left with nothing to learn
                targets = select_targets(base_model, config, spec.capabilities.layer_types, spec.default_targets)
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
