"""The Tier protocol: what a lower tier (disk, remote) offers the sidecar's movers.

The host tier is the pool the index manages (``index/`` + ``memory/``); lower tiers hold
*copies* of host entries, keyed by the same 32-byte key (namespace id + chain hash). They
are driven only by the sidecar's mover threads (``tiers/mover.py``), never by the control
loop, except :meth:`Tier.contains` on a tier whose ``local_index`` is true (an in-memory
lookup, safe and cheap on the loop).

Every stored value is a :data:`RECORD_HEADER` followed by the chunk's bytes. The header
names the key, the length and an xxh3-64 checksum of the payload; a reader checks all
three, so a torn write, a bit flip or a value stored under the wrong key is a miss (the
record is deleted and counted as ``corrupt``), never wrong KV.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol


KEY_BYTES = 32
RECORD_MAGIC = b"LMKVREC1"
RECORD_VERSION = 1
# magic, version, flags, namespace id, chain hash, payload length, payload xxh3-64
RECORD_HEADER = struct.Struct("<8sII16s16sQQ")
HEADER_BYTES = RECORD_HEADER.size  # 64


class CorruptRecord(ValueError):
    """A stored record whose header or checksum does not match what the reader expects."""


def pack_header(key: bytes, length: int, digest: int) -> bytes:
    assert len(key) == KEY_BYTES
    return RECORD_HEADER.pack(RECORD_MAGIC, RECORD_VERSION, 0, key[:16], key[16:], length, digest)


def parse_header(header: bytes | memoryview, key: bytes | None = None, length: int | None = None) -> tuple[bytes, int, int]:
    """``(key, length, checksum)`` of a header. Raises :class:`CorruptRecord` when it is not
    a record header, or names another key or length than the caller expects."""
    if len(header) < HEADER_BYTES:
        raise CorruptRecord(f"record shorter than its {HEADER_BYTES}-byte header")
    magic, version, _flags, ns, h, n, digest = RECORD_HEADER.unpack_from(header, 0)
    if magic != RECORD_MAGIC or version != RECORD_VERSION:
        raise CorruptRecord("not an lmkv record (bad magic or version)")
    if key is not None and ns + h != key:
        raise CorruptRecord("record holds another key")
    if length is not None and n != length:
        raise CorruptRecord(f"record holds {n} bytes, expected {length}")
    return ns + h, n, digest


@dataclass(frozen=True, slots=True)
class TierUsage:
    used_bytes: int
    capacity_bytes: int    # 0 when the tier does not know (a shared remote store)
    entries: int


@dataclass(slots=True)
class TierCounters:
    """What a tier did, for the stats snapshot. Mover threads update it under ``lock``."""

    puts: int = 0
    put_bytes: int = 0
    gets: int = 0            # successful reads into a slot
    get_bytes: int = 0
    misses: int = 0          # key absent
    corrupt: int = 0         # a record failed its header or checksum check (deleted)
    errors: int = 0          # I/O or connection failures
    evictions: int = 0       # records dropped to stay within capacity
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {k: getattr(self, k) for k in ("puts", "put_bytes", "gets", "get_bytes", "misses",
                                                  "corrupt", "errors", "evictions")}


class Tier(Protocol):
    """A lower cache tier. Methods other than ``contains`` (with ``local_index``) and
    ``usage`` may block on I/O: call them from mover threads only. None raises on a
    missing key, a corrupt record or an unreachable backend: those are ``False`` (a miss)
    and are counted in ``counters``; callers never see wrong bytes."""

    name: str               # "disk", "remote": the ``tier`` label in stats and metrics
    local_index: bool       # contains() is an in-memory lookup, safe on the control loop
    counters: TierCounters

    def put(self, key: bytes, data: memoryview) -> bool:
        """Store a copy of ``data`` under ``key`` (replacing any). False when refused
        (larger than the tier, backend down)."""
        ...

    def get_into(self, key: bytes, dest: memoryview) -> bool:
        """Fill ``dest`` (exactly the stored length) with the value of ``key``. True only
        when the record exists, names this key and ``len(dest)`` and its checksum matches."""
        ...

    def contains(self, key: bytes) -> bool:
        ...

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        """``contains`` for many keys at once (one round trip on a remote tier)."""
        ...

    def delete(self, key: bytes) -> None:
        ...

    def usage(self) -> TierUsage:
        ...

    def close(self) -> None:
        ...
