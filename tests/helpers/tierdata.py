"""Keys and values the tier tests store: values that say, at every offset, which key and
version they belong to, so a wrong or torn read cannot pass for a right one."""

from __future__ import annotations

from lmkv_mp.sidecar.tiers.base import Tier


def key(ns: bytes, i: int) -> bytes:
    """A key whose chain hash spreads over the disk tier's fan-out directories, as real hashes do."""
    return ns + (i * 0x9E3779B97F4A7C15 % (1 << 128)).to_bytes(16, "little")


def value(i: int, n: int, version: int = 0) -> bytes:
    return (i.to_bytes(4, "little") + version.to_bytes(4, "little")) * (n // 8) + b"\xee" * (n % 8)


def read(tier: Tier, k: bytes, n: int) -> bytes | None:
    buf = bytearray(n)
    return bytes(buf) if tier.get_into(k, memoryview(buf)) else None
