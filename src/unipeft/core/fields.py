"""Declared field constraints: a config states each field's rule once; `AdapterConfig.validate` checks them all.

    r: int = positive_int(8)
    dropout: float = fraction(0.0)            # 0 <= x < 1
    ratio: float = unit_ratio(0.1)            # 0 < x <= 1
    style: str = choice("houlsby", STYLES)
    schedule: list[float] = increasing_fractions([0.5])

Each helper returns a dataclass field whose metadata holds a `Rule`; the error names the
class, the field, what was expected and what was given.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError


def is_int(v: Any) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on a field's value and the words for what it expects."""

    check: Callable[[Any], bool]
    expected: str
    optional: bool = False  # None is accepted

    def error(self, owner: str, name: str, value: Any) -> ConfigError | None:
        """The ConfigError for `value`, or None when it satisfies the rule."""
        if (value is None and self.optional) or self.check(value):
            return None
        return ConfigError(f"{owner}.{name}: expected {self.expected}, got {value!r}")


def ruled(default: Any, rule: Rule, factory: bool = False) -> Any:
    """A dataclass field with `default` (a factory when `factory`) checked by `rule`."""
    if factory:
        return dataclasses.field(default_factory=lambda: list(default), metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


def positive_int(default: int | None, optional: bool = False) -> Any:
    """An integer > 0 (bools are refused)."""
    return ruled(default, Rule(lambda v: is_int(v) and v > 0, "a positive integer", optional))


def non_negative_int(default: int) -> Any:
    """An integer >= 0 (bools are refused)."""
    return ruled(default, Rule(lambda v: is_int(v) and v >= 0, "an integer >= 0"))


def non_negative(default: float) -> Any:
    """A number >= 0."""
    return ruled(default, Rule(lambda v: _is_number(v) and v >= 0, "a number >= 0"))


def positive_number(default: float | None, optional: bool = False) -> Any:
    """A number > 0."""
    return ruled(default, Rule(lambda v: _is_number(v) and v > 0, "a positive number", optional))


def fraction(default: float, what: str = "0 <= x < 1") -> Any:
    """A number in [0, 1) (dropout, a point of the run)."""
    return ruled(default, Rule(lambda v: _is_number(v) and 0.0 <= v < 1.0, what))


def unit_ratio(default: float, name: str = "x") -> Any:
    """A number in (0, 1] (a share of entries)."""
    return ruled(default, Rule(lambda v: _is_number(v) and 0.0 < v <= 1.0, f"a number with 0 < {name} <= 1"))


def choice(default: Any, options: Iterable[Any]) -> Any:
    """One of `options`."""
    opts = tuple(options)
    return ruled(default, Rule(lambda v: v in opts, f"one of {list(opts)}"))


def increasing_fractions(default: list[float]) -> Any:
    """An increasing list of fractions of the run in (0, 1)."""
    def ok(v: Any) -> bool:
        return isinstance(v, list) and all(_is_number(x) and 0.0 < x < 1.0 for x in v) and sorted(v) == v
    return ruled(default, Rule(ok, "an increasing list of fractions of the run in (0, 1), e.g. [0.33, 0.66]"),
                 factory=True)


def name_spec(optional: bool = True) -> Any:
    """A list of module names or a regex string (None allowed)."""
    return ruled(None, Rule(lambda v: isinstance(v, (str, list)), "a list of names or a regex string", optional))


def check_rules(config: Any) -> None:
    """Raise the first declared rule a field of `config` breaks."""
    owner = type(config).__name__
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        if rule is not None:
            err = rule.error(owner, f.name, getattr(config, f.name))
            if err is not None:
                raise err
