"""The one checksum both sides compute: xxh3-64 of a chunk's bytes (lower tiers' records,
``--verify on`` slots)."""

from __future__ import annotations

import xxhash


def checksum(data: memoryview | bytes | bytearray) -> int:
    """The payload checksum of a record (xxh3-64: ~20 GB/s, far above any tier's speed)."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_stream() -> xxhash.xxh3_64:
    """:func:`checksum` piece by piece: ``update()`` with the payload's pieces in order, then
    ``intdigest()`` equals ``checksum(payload)`` (lets a reader hash what it just read)."""
    return xxhash.xxh3_64()
