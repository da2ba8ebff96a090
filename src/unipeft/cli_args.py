"""Flags that may follow a verb's CONFIG among its `--key value` overrides (argparse's REMAINDER keeps them)."""
from __future__ import annotations

import argparse

from .core.errors import ConfigError


def pull_flags(args: argparse.Namespace, switches: tuple[str, ...] = (), valued: dict[str, type] | None = None
               ) -> list[str]:
    """Set `--switch` (True) and `--name VALUE` / `--name=VALUE` attributes found in args.overrides; return the
    remaining override tokens. A valued flag converts with its type and must be positive when it is an int;
    one typed `list` is repeatable and collects its values."""
    valued = valued or {}
    rest, tokens = [], list(args.overrides)
    while tokens:
        tok = tokens.pop(0)
        name, eq, inline = tok.partition("=")
        if tok in switches:
            setattr(args, tok[2:].replace("-", "_"), True)
        elif name in valued and valued[name] is list:  # a repeatable flag: its values are collected
            attr = name[2:].replace("-", "_")
            setattr(args, attr, [*(getattr(args, attr, None) or []), inline if eq else (tokens.pop(0) if tokens else "")])
        elif name in valued:
            value = inline if eq else (tokens.pop(0) if tokens else "")
            try:
                parsed = valued[name](value)
            except ValueError:
                raise ConfigError(f"{name}: expected {valued[name].__name__}, got {value!r}") from None
            if isinstance(parsed, int) and parsed < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
            setattr(args, name[2:].replace("-", "_"), parsed)
        else:
            rest.append(tok)
    return rest
