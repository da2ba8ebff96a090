"""`unipeft info CONFIG.yaml`: the trainable-parameter report and optimizer groups of a config, without training."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the info verb."""
    parser.add_argument("config", nargs="?", help="YAML run config")
    parser.add_argument("--methods", action="store_true", help="list the registered methods and their fields")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="config overrides, as for unipeft train")


def run(args: argparse.Namespace) -> int:
    """Build model + method as `train` would, print the report; nothing is written."""
    from ..core.errors import ConfigError

    if args.methods:
        from ..core.registry import public_methods
        from .strategy import BUILT_IN_METHODS, AdapterStrategy
        for name in sorted(public_methods()):
            print(AdapterStrategy.info_line(name))
        for built_in in BUILT_IN_METHODS.values():
            print(built_in.info_line())
        return 0
    if args.config is None:
        raise ConfigError("info: give a CONFIG.yaml (or --methods)")
    from ..core.report import trainable_report
    from .callbacks import method_param_groups
    from .config import load_config
    from .optim import param_groups
    from .setup import build_parts

    parts = build_parts(load_config(args.config, args.overrides))
    print(trainable_report(parts.model).table())
    for g in param_groups(parts.model, parts.cfg.optimizer, method_param_groups(parts.model)):
        n = sum(p.numel() for p in g["params"])
        print(f"optimizer group {g['name']!r}: {n:,} params, lr {g['lr']:g}, weight_decay {g['weight_decay']:g}")
    sizes = parts.splits.sizes()
    print(f"data: {sizes['train']}/{sizes['valid']}/{sizes['test']} train/valid/test examples, "
          f"{len(parts.label_names)} labels")
    return 0
