"""DiskTier (lmkv_mp/sidecar/tiers/disk.py): records, LRU capacity, restarts, corruption, threads."""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from lmkv_mp.sidecar.tiers.base import HEADER_BYTES, pack_header
from lmkv_mp.wire.checksum import checksum, checksum_stream
from lmkv_mp.sidecar.tiers.disk import DiskTier

from tests.helpers import tierdata
from tests.helpers.tierdata import read, value

NS = b"\x11" * 16


def key(i: int) -> bytes:
    return tierdata.key(NS, i)


def record_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file() and len(p.name) == 64]


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 65537, (1 << 20) + 3])
def test_put_get_byte_identical(tmp_path: Path, n: int) -> None:
    tier = DiskTier(tmp_path / "disk", 8 << 20)
    data = os.urandom(n)
    assert tier.put(key(n), memoryview(data))
    assert tier.contains(key(n))
    assert read(tier, key(n), n) == data
    assert tier.usage().used_bytes == HEADER_BYTES + n and tier.usage().entries == 1
    c = tier.counters.as_dict()
    assert (c["puts"], c["put_bytes"], c["gets"], c["get_bytes"], c["corrupt"]) == (1, n, 1, n, 0)


def test_miss_replace_delete_and_contains_many(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    assert read(tier, key(1), 100) is None and tier.counters.misses == 1
    assert tier.put(key(1), memoryview(value(1, 100)))
    assert tier.put(key(1), memoryview(value(1, 100, version=2)))   # replaces
    assert read(tier, key(1), 100) == value(1, 100, version=2)
    assert tier.usage().entries == 1 and len(record_files(tmp_path)) == 1
    assert tier.put(key(2), memoryview(value(2, 50)))
    assert tier.contains_many([key(1), key(3), key(2)]) == [True, False, True]
    tier.delete(key(1))
    tier.delete(key(3))   # absent: nothing happens
    assert tier.contains_many([key(1), key(2)]) == [False, True]
    assert tier.usage().used_bytes == HEADER_BYTES + 50 and len(record_files(tmp_path)) == 1


def test_keys_by_namespace_in_lru_order(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    other = b"\x99" * 16 + key(5)[16:]
    for k in (key(1), other, key(2)):
        tier.put(k, memoryview(b"x"))
    read(tier, key(1), 1)
    assert tier.keys(NS) == [key(2), key(1)]
    assert tier.keys(b"\x99" * 16) == [other] and tier.keys() == [other, key(2), key(1)]


def test_lru_eviction_within_capacity_and_too_large_refused(tmp_path: Path) -> None:
    n = 1000
    tier = DiskTier(tmp_path, 3 * (HEADER_BYTES + n))
    for i in range(3):
        assert tier.put(key(i), memoryview(value(i, n)))
    assert read(tier, key(0), n) == value(0, n)           # 0 is now the most recent
    assert tier.put(key(3), memoryview(value(3, n)))       # evicts 1, the least recent
    assert tier.contains_many([key(i) for i in range(4)]) == [True, False, True, True]
    assert tier.counters.evictions == 1
    assert tier.usage().used_bytes == 3 * (HEADER_BYTES + n)
    assert not tier.put(key(9), memoryview(bytes(3 * (HEADER_BYTES + n))))   # larger than the tier
    assert not tier.contains(key(9)) and tier.usage().entries == 3
    assert len(record_files(tmp_path)) == 3


def test_restart_rebuilds_index_and_keeps_lru_order(tmp_path: Path) -> None:
    n = 5000
    cap = 4 * (HEADER_BYTES + n)
    first = DiskTier(tmp_path, cap)
    for i in range(4):
        assert first.put(key(i), memoryview(value(i, n)))
    assert read(first, key(0), n) == value(0, n)            # order now 1, 2, 3, 0
    assert read(first, key(2), n) == value(2, n)            # order now 1, 3, 0, 2
    first.close()
    second = DiskTier(tmp_path, cap)
    assert second.usage() == first.usage()
    assert all(read(second, key(i), n) == value(i, n) for i in (3, 0, 2))  # order 1, 3, 0, 2 as before
    assert second.put(key(4), memoryview(value(4, n)))
    assert second.put(key(5), memoryview(value(5, n)))
    assert second.contains_many([key(i) for i in range(6)]) == [True, False, True, False, True, True]
    # One more restart with a smaller capacity keeps the most recent records only.
    third = DiskTier(tmp_path, 2 * (HEADER_BYTES + n))
    assert third.contains_many([key(4), key(5)]) == [True, True] and third.usage().entries == 2
    assert len(record_files(tmp_path)) == 2


def test_restart_lru_order_is_exact(tmp_path: Path) -> None:
    n = 100
    first = DiskTier(tmp_path, 3 * (HEADER_BYTES + n))
    for i in range(3):
        first.put(key(i), memoryview(value(i, n)))
    read(first, key(0), n)                                  # order 1, 2, 0
    second = DiskTier(tmp_path, 3 * (HEADER_BYTES + n))
    second.put(key(3), memoryview(value(3, n)))
    assert second.contains_many([key(i) for i in range(4)]) == [True, False, True, True]


def test_open_removes_stale_temp_files_and_leaves_foreign_files(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(key(1), memoryview(value(1, 64)))
    final = record_files(tmp_path)[0]
    stale = final.with_name(final.name + ".7.tmp")
    stale.write_bytes(b"half a record")                   # a writer that crashed before its rename
    (tmp_path / "lock").write_bytes(b"123\n")            # the sidecar's lock file
    (final.parent / "notes.txt").write_bytes(b"not ours")
    again = DiskTier(tmp_path, 1 << 20)
    assert not stale.exists()
    assert (tmp_path / "lock").exists() and (final.parent / "notes.txt").exists()
    assert again.usage().entries == 1 and again.counters.corrupt == 0


def test_directory_and_file_permissions(tmp_path: Path) -> None:
    d = tmp_path / "a" / "disk"
    tier = DiskTier(d, 1 << 20)
    tier.put(key(1), memoryview(b"x" * 10))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (f,) = record_files(d)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(f.parent.stat().st_mode) == 0o700


def corrupt(kind: str, path: Path, other: Path) -> None:
    if kind == "flip":      # one bit of the payload
        with open(path, "r+b") as f:
            f.seek(HEADER_BYTES + 500)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x10]))
    elif kind == "truncate":
        os.truncate(path, path.stat().st_size - 1)
    elif kind == "other-key":   # a whole, valid record of another key under this name
        shutil.copyfile(other, path)
    elif kind == "garbage":
        path.write_bytes(os.urandom(HEADER_BYTES + 1000))
    elif kind == "header-only":
        path.write_bytes(pack_header(bytes.fromhex(path.name), 1000, 0))


KINDS = ["flip", "truncate", "other-key", "garbage", "header-only"]


@pytest.mark.parametrize("when", ["live", "after-restart"])
@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_record_is_never_served_deleted_and_counted(tmp_path: Path, kind: str, when: str) -> None:
    n = 1000
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(key(1), memoryview(value(1, n)))
    tier.put(key(2), memoryview(value(2, n)))
    path = tier._path(key(1))
    corrupt(kind, path, tier._path(key(2)))
    if when == "after-restart":
        tier = DiskTier(tmp_path, 1 << 20)
    assert read(tier, key(1), n) is None
    assert tier.counters.corrupt == 1
    assert not path.exists() and not tier.contains(key(1))
    assert tier.usage().entries == 1 and read(tier, key(2), n) == value(2, n)
    assert read(tier, key(1), n) is None and tier.counters.corrupt == 1   # gone: a plain miss now


def test_wrong_length_request_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put(key(1), memoryview(value(1, 1000)))
    assert read(tier, key(1), 999) is None
    assert tier.counters.corrupt == 1 and not tier.contains(key(1))


def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=True)
    assert tier.put(key(1), memoryview(value(1, 4096)))
    assert read(DiskTier(tmp_path, 1 << 20), key(1), 4096) == value(1, 4096)


def test_streamed_checksum_equals_the_one_shot_checksum() -> None:
    data = os.urandom(3 << 20 | 17)
    h = checksum_stream()
    for off in range(0, len(data), 100_000):
        h.update(memoryview(data)[off:off + 100_000])
    assert h.intdigest() == checksum(data)


def test_capacity_must_hold_a_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--disk-size"):
        DiskTier(tmp_path, HEADER_BYTES)


def test_concurrent_put_get_never_yields_a_partial_or_wrong_record(tmp_path: Path) -> None:
    """Writers replace a few keys with new versions while readers read them, under
    eviction pressure: every successful read is exactly one whole version of its key."""
    n, keys, writers, readers, rounds = 64 << 10, 6, 2, 3, 60
    tier = DiskTier(tmp_path, 4 * (HEADER_BYTES + n))      # room for 4 of the 6 keys
    errors: list[str] = []
    hits = [0]

    def write(w: int) -> None:
        for r in range(rounds):
            i = (r + w) % keys
            if not tier.put(key(i), memoryview(value(i, n, version=w * rounds + r))):
                errors.append(f"put {i} failed")

    def check(w: int) -> None:
        buf = bytearray(n)
        for r in range(rounds * 2):
            i = (r * 7 + w) % keys
            if tier.get_into(key(i), memoryview(buf)):
                version = int.from_bytes(buf[4:8], "little")
                if bytes(buf) != value(i, n, version):
                    errors.append(f"key {i}: a read that is not one whole version")
                hits[0] += 1

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=check, args=(w,)) for w in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert hits[0] > 0 and tier.counters.corrupt == 0
    files = record_files(tmp_path)
    assert tier.usage().entries == len(files) <= 4
    assert tier.usage().used_bytes == sum(f.stat().st_size for f in files) <= tier.capacity
    assert not [p for p in tmp_path.rglob("*.tmp")], "no temp file outlives its put"
