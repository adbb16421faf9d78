"""Dataclass messages to and from msgpack maps, with every field checked at decode time.

The generic half of protocol.py's codec: a message class's fields and annotations are
compiled once into checkers (``int`` is a 64-bit integer, ``bytes`` exactly bytes, a
``StrEnum`` one of its values, lists and nested message classes recursively, ``X | None``
nullable). msgpack yields exact builtin types, so exact ``type(v) is`` tests are both
correct and fast. protocol.py turns a :class:`SchemaError` into a BAD_REQUEST error reply.

Packed arrays are the codec's business: a :class:`U64Array` field travels as one ``bytes``
of little-endian uint64s and decodes to a U64Array, so no message's sender or reader
packs or unpacks bytes itself.
"""

from __future__ import annotations

import array
import enum
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Iterable, Union

I64_MAX = 2**63 - 1


class U64Array(array.array):  # type: ignore[type-arg]
    """Unsigned 64-bit integers (offsets, checksums): a typed array, one packed
    little-endian ``uint64`` each on the wire. Compares equal to any array of the same
    values; ``numpy.asarray`` views it without a copy."""

    def __new__(cls, values: Iterable[int] = ()) -> U64Array:
        return super().__new__(cls, "Q", values)

    @classmethod
    def from_wire(cls, packed: bytes) -> U64Array:
        """The array ``packed`` holds; ValueError if its length is not a multiple of 8."""
        if len(packed) % 8:
            raise ValueError(f"length {len(packed)} is not a whole number of uint64s")
        out = cls()
        out.frombytes(packed)
        if _BIG_ENDIAN:
            out.byteswap()
        return out

    def to_wire(self) -> bytes:
        if _BIG_ENDIAN:
            swapped = U64Array(self)
            swapped.byteswap()
            return swapped.tobytes()
        return self.tobytes()


_BIG_ENDIAN = sys.byteorder == "big"
assert U64Array().itemsize == 8, "array typecode Q is not 64 bits on this platform"


def pack_u64(values: Any) -> bytes:
    """What a :class:`U64Array` field puts on the wire for ``values``: a U64Array, any
    sequence of ints, or bytes already packed (frames built by hand), kept as they are."""
    if isinstance(values, U64Array):
        return values.to_wire()
    if isinstance(values, (bytes, bytearray, memoryview)):
        return bytes(values)
    return U64Array(values).to_wire()


class SchemaError(ValueError):
    """A map that is not a well-formed message; the text names the message and field."""


class _Bad(Exception):
    """A field value of the wrong shape; the message is relative to the field."""


_Checker = typing.Callable[[Any], Any]
_Encoder = typing.Callable[[Any], Any] | None   # None: the value goes out as it is
_SCHEMAS: dict[type, list[tuple[str, _Checker, bool, _Encoder]]] = {}


def _schema(cls: type) -> list[tuple[str, _Checker, bool, _Encoder]]:
    """(name, checker, required, encoder) per field, compiled once per message class."""
    cached = _SCHEMAS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = [(f.name, _compile(hints[f.name]), f.default is MISSING and f.default_factory is MISSING,
                   _encoder(hints[f.name])) for f in fields(cls)]
        _SCHEMAS[cls] = cached
    return cached


def _encoder(tp: Any) -> _Encoder:
    """How a field of annotation ``tp`` goes into a map: packed arrays packed, nested
    messages as maps (recursively, through lists and ``X | None``), anything else as it is."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = _encoder(next(a for a in typing.get_args(tp) if a is not type(None)))
        return None if inner is None else (lambda v: None if v is None else inner(v))
    if origin is list:
        item = _encoder(typing.get_args(tp)[0])
        return None if item is None else (lambda v: [item(x) for x in v])
    if tp is U64Array:
        return pack_u64
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return to_map
    return None


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
    if tp is U64Array:
        def check_u64s(v: Any) -> U64Array:
            if type(v) is not bytes:
                raise _Bad("must be bytes (packed uint64s)")
            try:
                return U64Array.from_wire(v)
            except ValueError as e:
                raise _Bad(str(e)) from None
        return check_u64s
    if isinstance(tp, type) and issubclass(tp, enum.StrEnum):
        values = ", ".join(m.value for m in tp)

        def check_enum(v: Any) -> Any:
            if type(v) is not str:
                raise _Bad("must be a string")
            try:
                return tp(v)
            except ValueError:
                raise _Bad(f"{v!r} is not one of {values}") from None
        return check_enum
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
    for name, check, required, _encode in _schema(cls):
        if name in body:
            try:
                kwargs[name] = check(body[name])
            except _Bad as e:
                raise SchemaError(f"{where}.{name} {e}") from None
        elif required:
            raise SchemaError(f"{where}: missing field '{name}'")
    return cls(**kwargs)


def to_map(msg: Any) -> dict[str, Any]:
    """The message as a map keyed by field name: nested messages as maps, packed arrays
    as bytes."""
    out: dict[str, Any] = {}
    for name, _check, _req, encode in _schema(type(msg)):
        v = getattr(msg, name)
        out[name] = v if encode is None else encode(v)
    return out
