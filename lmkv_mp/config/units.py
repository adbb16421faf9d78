"""Byte sizes and durations as people write them (``512MiB``, ``250ms``): parse and print.

Used by the configuration and by the command-line tools; no other dependencies.
"""

from __future__ import annotations

import math
import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
# Sizes end up in fixed-width header fields and C calls.
MAX_SIZE = (1 << 63) - 1


def _show(value: object) -> str:
    """repr() of a bad value, cut short: error messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:76] + "...'"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


_SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": KiB, "ki": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mi": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gi": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "ti": TiB, "tib": TiB, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"([0-9]+(?:_[0-9]+)*)(?:\.([0-9]+))?\s*([a-z]*)", re.IGNORECASE | re.ASCII)


def parse_size(text: str) -> int:
    """Parse a byte size.

    Accepts a plain byte count (``4096``, ``1_000_000``, ``512B``) or a number with a unit,
    case-insensitive, with an optional space: binary ``KiB MiB GiB TiB``, their Kubernetes
    spellings ``Ki Mi Gi Ti`` and bare ``K M G T``; decimal ``KB MB GB TB``. A fraction
    with a unit (``1.5GiB``) is rounded down to whole bytes. Returns a count in
    0..MAX_SIZE; raises ValueError (one line, naming the value) for anything else,
    including negative numbers and the empty string.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None or m.group(3).lower() not in _SIZE_UNITS:
        if text.strip().startswith("-"):
            raise ValueError(f"{_show(text)} is negative; use e.g. 512MiB, 8GiB or a byte count")
        raise ValueError(f"{_show(text)} is not a size; use e.g. 512MiB, 8GiB or a byte count")
    whole, frac, unit = m.group(1), m.group(2), m.group(3).lower()
    scale = _SIZE_UNITS[unit]
    if frac is not None and scale == 1:
        raise ValueError(f"{_show(text)} is not a whole number of bytes; use e.g. 1.5GiB or 4096")
    n = int(whole.replace("_", "")) * scale
    if frac is not None:
        n += int(frac) * scale // 10 ** len(frac)
    if n > MAX_SIZE:
        raise ValueError(f"{_show(text)} is too large; the most is {format_size(MAX_SIZE)}")
    return n


def format_size(n: int) -> str:
    """Format a byte count exactly, in the largest binary unit that divides it.

    ``536870912 -> '512MiB'``, ``3072 -> '3KiB'``, ``1536 -> '1536B'``, ``0 -> '0B'``.
    The result always parses back to ``n`` with :func:`parse_size`. Raises ValueError for
    a negative count.
    """
    if n < 0:
        raise ValueError(f"{n} is negative; a size is a byte count >= 0")
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


_DURATION_UNITS: dict[str, float] = {
    "": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0,
}
_DURATION_RE = re.compile(
    r"((?:[0-9]+(?:_[0-9]+)*)(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)", re.IGNORECASE | re.ASCII
)


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """Parse a duration into seconds.

    Accepts a number of seconds (``5``, ``0.5``) or a number with a unit, case-insensitive:
    ``us ms s m min h`` (``250ms``, ``2m``). Returns a finite float; zero is rejected unless
    ``allow_zero``. Raises ValueError (one line, naming the value) for negative numbers,
    garbage, infinities and NaN.
    """
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None or m.group(2).lower() not in _DURATION_UNITS:
        if text.strip().startswith("-"):
            raise ValueError(f"{_show(text)} is negative; use e.g. 5s, 250ms or 2m")
        raise ValueError(f"{_show(text)} is not a duration; use e.g. 5s, 250ms, 2m or a number of seconds")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"{_show(text)} is too long; use e.g. 5s, 250ms or 2m")
    if seconds == 0 and not allow_zero:
        raise ValueError(f"{_show(text)} must be above 0; use e.g. 5s, 250ms or 2m")
    return seconds
