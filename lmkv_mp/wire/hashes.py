"""HashList: a prompt's chain hashes as one value (ARCHITECTURE §3, §5).

A hash list travels as one concatenated ``bytes`` (``HASH_BYTES`` × n). This type is that
concatenation with the slicing written once: ``len`` counts hashes, an index gives one
hash, a slice gives another HashList, iteration yields the hashes in order. Its length is
always a multiple of ``HASH_BYTES`` (checked at construction), so every ``i``-th hash is
whole. ``.bytes`` is exactly what goes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, overload

from lmkv_mp.wire.keys import HASH_BYTES, ChunkHash, split_hashes


@dataclass(frozen=True, slots=True)
class HashList:
    """``HASH_BYTES``-byte chain hashes, concatenated; ValueError if the length is ragged."""

    packed: bytes = b""

    def __post_init__(self) -> None:
        if type(self.packed) is not bytes:
            raise TypeError(f"a HashList holds bytes, not {type(self.packed).__name__}")
        if len(self.packed) % HASH_BYTES:
            raise ValueError(f"length {len(self.packed)} is not a multiple of {HASH_BYTES}")

    @classmethod
    def of(cls, hashes: Iterable[bytes]) -> HashList:
        """The list of these hashes, each exactly ``HASH_BYTES`` long (else ValueError)."""
        parts = list(hashes)
        if any(len(h) != HASH_BYTES for h in parts):
            raise ValueError(f"every hash is {HASH_BYTES} bytes")
        return cls(b"".join(parts))

    @property
    def bytes(self) -> bytes:
        """The concatenation, as it travels."""
        return self.packed

    def __len__(self) -> int:
        return len(self.packed) // HASH_BYTES

    @overload
    def __getitem__(self, i: int) -> ChunkHash: ...

    @overload
    def __getitem__(self, i: slice) -> HashList: ...

    def __getitem__(self, i: int | slice) -> ChunkHash | HashList:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return HashList(self.packed[start * HASH_BYTES:max(start, stop) * HASH_BYTES])
            return HashList.of(self.split()[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"hash {i} of a list of {n}")
        i %= n
        return ChunkHash(self.packed[i * HASH_BYTES:(i + 1) * HASH_BYTES])

    def __iter__(self) -> Iterator[ChunkHash]:
        return iter(self.split())

    def __bytes__(self) -> bytes:
        return self.packed

    def split(self) -> tuple[ChunkHash, ...]:
        """Every hash, in order (split in C: this is on every LOOKUP's path)."""
        return split_hashes(self.packed)

    def keys(self, namespace: bytes) -> list[bytes]:
        """The index keys (``namespace + hash``) of every hash, in order."""
        return [namespace + h for h in self.split()]
