"""Typed parameter declarations, read once for validation, construction and docs.

Streams, strategies, models and the grid itself declare their parameters as
dataclasses whose fields carry `help` metadata (the peft convention). `parse`
turns a YAML mapping into such a dataclass, or raises `ConfigError` naming the
field, the bad value and the fix, so every bad input is caught before a run starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad grid or parameter; the message names the field and the fix."""


def param(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with help text: `x: int = param(5, "what x is")`."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(
            default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


def defaults(cls: type) -> dict[str, Any]:
    """The declared default of every field of dataclass `cls` that has one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every field, for `forgetless strategies`."""
    hints = typing.get_type_hints(cls)
    declared = defaults(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = declared.get(f.name, "(required)")
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking keys and types.

    `where` is the dotted path of `data` in the grid (e.g. `strategies[2]`), so
    errors read `strategies[2].buffer.size: expected an integer, got 'big'`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'grid'}: expected a mapping of parameters, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{where or 'grid'}: unknown key {key!r}{suggest(key, fields)}; "
            f"allowed keys: {', '.join(sorted(fields)) or '(none)'}"
        )
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = coerce(data[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            about = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
            raise ConfigError(
                f"{where or 'grid'}: missing required key {name!r}{about}; "
                f"add `{name}: <{_type_name(hints[name])}>`"
            )
    instance = cls(**values)
    check = getattr(instance, "validate", None)
    if check is not None:
        check(where)
    return instance


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against type `hint`; ints are accepted where floats are."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                f"{suggest(value, map(str, allowed))}"
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(hint)[:1] or (Any,)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")


def positive(value: float | None, where: str) -> None:
    """Raise unless `value` is None or > 0 (budgets, sizes, rates)."""
    if value is not None and value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value!r}")


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(map(repr, get_args(hint)))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if origin is list:
        return f"list[{_type_name(get_args(hint)[0])}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
