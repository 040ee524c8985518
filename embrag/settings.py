"""Typed configuration values, checked generically against the dataclass annotations.

Config sections are frozen dataclasses. Their annotations (``int``, ``float``, ``bool``, ``str``,
``Literal[...]``, ``tuple[T, ...]``, ``tuple[A, B]``, ``X | None``, nested dataclasses) say what a
value may be: :func:`coerce` converts a JSON value to the field's type or raises a
:class:`ConfigError` naming the field, and :func:`build` turns a range error raised by a
dataclass's ``__post_init__`` into one too. A new field or section is therefore checked without
touching this module; range checks belong in ``__post_init__``.

``--set section.field=value`` goes through :func:`apply_overrides`: an unknown section or field
gets a suggestion, a wrong type or range one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin, get_type_hints

from embrag.errors import ConfigError

_NONE_WORDS = ("null", "none", "None")


@functools.cache
def field_types(kind: type) -> dict[str, Any]:
    """``field -> resolved annotation`` of the init fields of dataclass ``kind``."""
    hints = get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind) if f.init}


def describe(tp: Any) -> str:
    """A short human name for an annotation: "an integer", "one of 'v17', 'v18'", ..."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) if a is not type(None) else "null" for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}, e.g. [0.3,0.5]"
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, describe(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (as JSON gives it) converted to annotation ``tp``; ConfigError naming ``name`` otherwise."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg, name)
                except ConfigError:
                    continue
        raise _wrong(name, tp, value)
    if origin is Literal:
        for choice in args:  # type-exact: True must not pass for 1
            if value == choice and type(value) is type(choice):
                return choice
        raise _wrong(name, tp, value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _wrong(name, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _wrong(name, tp, value)
        return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _wrong(name, tp, value)
        return build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:  # an annotation this module does not know: a bug in the config classes, not the user's input
        raise TypeError(f"{name}: unsupported annotation {tp!r}; extend embrag.settings.coerce")
    raise _wrong(name, tp, value)


def _wrong(name: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{name}: expected {describe(tp)}, got {value!r}")


def build(kind: type, values: dict[str, Any], section: str) -> Any:
    """Dataclass ``kind`` from JSON ``values``: unknown keys, types and ranges checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected an object of fields, got {values!r}")
    types_ = field_types(kind)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{section}: unknown field {', '.join(unknown)}{_suggest(unknown[0], types_, section)}; "
                          f"fields: {', '.join(types_)}")
    typed = {k: coerce(v, types_[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return kind(**typed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}: {e}") from e


def choices(kind: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field (empty when the field is not a Literal)."""
    tp = field_types(kind)[name]
    return get_args(tp) if get_origin(tp) is Literal else ()


def check_choice(value: Any, kind: type, name: str, option: str) -> Any:
    """``value`` if it is one of the Literal field's choices, else ConfigError for ``option``."""
    allowed = choices(kind, name)
    if value not in allowed:
        raise ConfigError(f"{option} {value!r}: expected one of {', '.join(map(str, allowed))}")
    return value


def parse_text(raw: str, tp: Any, name: str) -> Any:
    """A command-line value for annotation ``tp``: JSON when it parses, the raw text for strings."""
    if raw.strip() in _NONE_WORDS and _allows_none(tp):
        return None
    if _is_text(tp):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        return coerce(value if isinstance(value, str) else raw, tp, name)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return coerce(value, tp, name)


def _allows_none(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _is_text(tp: Any) -> bool:
    """str, a Literal of strings, or either of them | None."""
    if _allows_none(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return len(rest) == 1 and _is_text(rest[0])
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return tp is str


def apply_overrides(cfg: Any, items: Iterable[str], option: str = "--set") -> Any:
    """``cfg`` (a dataclass of section dataclasses) with ``section.field=value`` items applied.

    Items of one section are applied together, so fields checked against each other (window size
    and overlap) can change at once.
    """
    sections = {f.name: f for f in dataclasses.fields(cfg) if f.init}
    changes: dict[str, dict[str, Any]] = {}
    given: dict[str, list[str]] = {}  # the items as typed, for messages
    for item in items:
        key, sep, raw = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not (sep and section and name and raw):
            raise ConfigError(f"{option} {item!r}: expected section.field=value, e.g. {option} train.epochs=3")
        if section not in sections:
            raise ConfigError(f"{option} {item}: unknown section {section!r}{_suggest(section, sections)}; "
                              f"sections: {', '.join(sections)}")
        types_ = field_types(type(getattr(cfg, section)))
        if name not in types_:
            raise ConfigError(f"{option} {item}: unknown field {section}.{name}{_suggest(name, types_, section)}; "
                              f"fields of {section}: {', '.join(types_)}")
        try:
            changes.setdefault(section, {})[name] = parse_text(raw, types_[name], f"{section}.{name}")
        except ConfigError as e:
            raise ConfigError(f"{option} {item}: {e}") from e
        given.setdefault(section, []).append(item)
    replaced = {}
    for section, values in changes.items():
        try:
            replaced[section] = dataclasses.replace(getattr(cfg, section), **values)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{' '.join(f'{option} {i}' for i in given[section])}: {e}") from e
    try:
        return dataclasses.replace(cfg, **replaced)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{option}: {e}") from e


def _suggest(word: str, known: Iterable[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if not match:
        return ""
    return f" (did you mean {prefix + '.' if prefix else ''}{match[0]}?)"
