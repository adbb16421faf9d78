"""Dataclass messages to and from msgpack maps, with every field checked at decode time.

The generic half of protocol.py's codec: a message class's fields and annotations are
compiled once into checkers (``int`` is a 64-bit integer, ``bytes`` exactly bytes, lists
and nested message classes recursively, ``X | None`` nullable). msgpack yields exact
builtin types, so exact ``type(v) is`` tests are both correct and fast. protocol.py turns
a :class:`SchemaError` into a BAD_REQUEST error reply.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Union

I64_MAX = 2**63 - 1


class SchemaError(ValueError):
    """A map that is not a well-formed message; the text names the message and field."""


class _Bad(Exception):
    """A field value of the wrong shape; the message is relative to the field."""


_Checker = typing.Callable[[Any], Any]
_SCHEMAS: dict[type, list[tuple[str, _Checker, bool]]] = {}


def _schema(cls: type) -> list[tuple[str, _Checker, bool]]:
    """(name, checker, required) per field, compiled once per message class."""
    cached = _SCHEMAS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = [(f.name, _compile(hints[f.name]), f.default is MISSING and f.default_factory is MISSING)
                  for f in fields(cls)]
        _SCHEMAS[cls] = cached
    return cached


def _compile(tp: Any) -> _Checker:
    """A checker for annotation ``tp``: returns the (converted) value or raises _Bad.
    msgpack yields exact builtin types, so exact ``type(v) is`` tests are correct and fast."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        inner = _compile(next(a for a in args if a is not type(None)))
        nullable = type(None) in args
        return lambda v: None if v is None and nullable else inner(v)
    if origin is list:
        item = _compile(typing.get_args(tp)[0])

        def check_list(v: Any) -> list[Any]:
            if type(v) is not list:
                raise _Bad("must be a list")
            return [item(x) for x in v]
        return check_list
    if origin is dict or tp is Any:
        return _exact(dict, "a map") if origin is dict else (lambda v: v)
    if tp is int:
        def check_int(v: Any) -> int:
            if type(v) is not int or not -I64_MAX <= v <= I64_MAX:
                raise _Bad("must be a 64-bit integer")
            return v
        return check_int
    if tp is float:
        def check_float(v: Any) -> float:
            if type(v) is float or type(v) is int:
                return float(v)
            raise _Bad("must be a number")
        return check_float
    if tp in (bool, str, bytes):
        return _exact(tp, {bool: "a bool", str: "a string", bytes: "bytes"}[tp])
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        def check_obj(v: Any) -> Any:
            if type(v) is not dict:
                raise _Bad("must be a map")
            return from_map(tp, v, tp.__name__)
        return check_obj
    raise TypeError(f"unsupported annotation {tp!r}")


def _exact(tp: type, what: str) -> _Checker:
    def check(v: Any) -> Any:
        if type(v) is not tp:
            raise _Bad(f"must be {what}")
        return v
    return check


def from_map(cls: type, body: dict[str, Any], where: str) -> Any:
    """``cls(**body)`` after checking every field against its annotation; raises
    :class:`SchemaError` naming ``where`` and the field. Unknown keys are ignored (either
    side may add optional fields)."""
    kwargs: dict[str, Any] = {}
    for name, check, required in _schema(cls):
        if name in body:
            try:
                kwargs[name] = check(body[name])
            except _Bad as e:
                raise SchemaError(f"{where}.{name} {e}") from None
        elif required:
            raise SchemaError(f"{where}: missing field '{name}'")
    return cls(**kwargs)


def to_map(msg: Any) -> dict[str, Any]:
    """The message as a map keyed by field name, nested messages as maps."""
    out: dict[str, Any] = {}
    for name, _check, _req in _schema(type(msg)):
        v = getattr(msg, name)
        if isinstance(v, list) and v and hasattr(v[0], "__dataclass_fields__"):
            v = [to_map(x) for x in v]
        out[name] = v
    return out
