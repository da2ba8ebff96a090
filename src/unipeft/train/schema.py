"""Typed dataclasses from plain dicts (YAML): unknown keys suggest the nearest valid key, types are checked."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Union

import yaml

from ..core.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 requires a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.[\d_]*)?[eE][-+]?\d+$"),
    list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def suggest(key: str, valid: list[str], where: str = "") -> str:
    """'; did you mean 'where.x'?' for the closest valid key, or the list of valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{where + '.' if where else ''}{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def unknown_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    """The error for a key that is not part of a config section."""
    name = f"{where}.{key}" if where else key
    return ConfigError(f"unknown config key '{name}'{suggest(key, valid, where)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` (ints to floats, lists to dataclasses), or raise ConfigError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        options = [a for a in typing.get_args(tp) if isinstance(a, str)]
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}{hint}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {type(value).__name__} "
                              f"{_show(value)}")
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {_show(value)}")
        return {check_type(k, key_t, where): check_type(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got "
                              f"{type(value).__name__} {_show(value)}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`: unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types_:
            raise unknown_key_error(where, str(key), list(types_))
        kwargs[key] = check_type(value, types_[key], f"{where}.{key}" if where else key)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {missing}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML/JSON output)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted='a.b', creating mappings on the way."""
    *parents, last = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None or isinstance(child, str):  # 'model: minilm' shorthand becomes a mapping
            child = {} if child is None else {"name": child}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted}: '{'.'.join(parents[:i + 1])}' is not a section")
        node = child
    node[last] = value
