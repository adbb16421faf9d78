"""Lower tiers that fail under the sidecar: a disk tier that is full (at its capacity, and
its filesystem out of space), and a Redis killed in the middle of writes.

The promises: the host tier keeps serving every chunk it holds, byte for byte; a failed
copy down is counted and is a future miss, never a torn record that a reader could get;
no mover stays stuck and no pin taken for a copy outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import SidecarHandle, stats, wait_for
from tests.faults.common import assert_no_leaks
from tests.sidecar.test_tiers import (CHUNK_BYTES, NS, chunk_hashes, disk_dir, disk_flags, load, payload, quiet,  # noqa: F401
                              remote_flags, store)

pytestmark = pytest.mark.slow


def records(disk: Path) -> list[Path]:
    return [p for p in disk.rglob("*") if p.is_file() and p.name != "lock"]


def test_disk_tier_at_capacity_evicts_its_oldest_records(sidecar: Callable[..., SidecarHandle],
                                                         disk_dir: Path) -> None:
    flags = ("--disk-dir", str(disk_dir), "--disk-size", "1MiB", "--write-policy", "write-through")
    h = sidecar(*flags)                             # 1 MiB holds three 256 KiB records with headers
    writer = h.client(namespaces=[NS])
    hashes = chunk_hashes(10, seed=30)
    for i in range(0, 10, 2):
        assert store(writer, hashes[i:i + 2]) == 2
        quiet(h)
    s = quiet(h)
    disk = s["tiers"]["disk"]
    assert disk["entries"] == 3 and disk["used_bytes"] <= 1 << 20 and disk["evictions"] == 7
    assert disk["errors"] == 0 and len(records(disk_dir)) == 3
    assert load(writer, hashes) == [payload(x) for x in hashes], "the host tier still has them all"
    assert_no_leaks(h, CHUNK_BYTES)
    h.close()

    # Two movers copy a pair's chunks concurrently, so which of a pair was written last (and
    # so outlived the other) is a race: the disk holds three of the newest four.
    on_disk = [x for x in hashes if any(p.name.endswith(x.hex()) for p in records(disk_dir))]
    assert len(on_disk) == 3 and set(on_disk) <= set(hashes[-4:]), on_disk
    cold = sidecar(*flags)                          # a new pool: only the disk remembers
    got = load(cold.client(namespaces=[NS]), on_disk)
    assert got == [payload(x) for x in on_disk], "what the disk kept comes back from it"
    assert load(cold.client(namespaces=[NS]), hashes[:2]) == [], "evicted everywhere: a miss"


@pytest.fixture
def full_disk() -> Iterator[Path]:
    """A real filesystem of 1 MiB (tmpfs, mounted for this test and unmounted after), which
    runs out of space long before the tier's --disk-size: the disk-full case."""
    d = Path(tempfile.mkdtemp(prefix="lmkv-fulldisk-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        d.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {mounted.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def test_a_full_disk_costs_copies_not_chunks(sidecar: Callable[..., SidecarHandle], full_disk: Path) -> None:
    """The filesystem under --disk-dir fills up (ENOSPC part-way through a record). Stores and
    loads go on from the host tier; the failed copies are counted, leave no partial file and
    hold nothing; once the filesystem has room again, the tier writes again."""
    h = sidecar(*disk_flags(full_disk))          # --disk-size 64MiB: the filesystem is what is full
    writer = h.client(namespaces=[NS])
    before = chunk_hashes(3, seed=31)
    assert store(writer, before) == 3            # three 256 KiB records fit in 1 MiB, a fourth does not
    assert quiet(h)["tiers"]["disk"]["entries"] == 3

    during = chunk_hashes(4, seed=32)
    assert store(writer, during) == 4
    s = quiet(h)
    assert s["tiers"]["disk"]["errors"] >= 4 and s["tiers"]["disk"]["entries"] == 3
    assert len(records(full_disk)) == 3, "no partial record is left"
    assert all(p.stat().st_size > CHUNK_BYTES for p in records(full_disk))
    assert load(writer, before + during) == [payload(x) for x in before + during]
    assert_no_leaks(h, CHUNK_BYTES)

    subprocess.run(["mount", "-o", "remount,size=4m", str(full_disk)], check=True)   # room again
    after = chunk_hashes(2, seed=33)
    assert store(writer, after) == 2
    assert quiet(h)["tiers"]["disk"]["entries"] == 5, "writes reach the disk again"
    h.close()


@pytest.fixture
def persistent_redis() -> Iterator[Any]:
    """A redis-server that logs every write to its append-only file before answering, so
    what it took before a SIGKILL is there after the restart (and a value cut off mid-way
    is what it has to cope with)."""
    from tests.helpers.redisproc import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


def test_redis_killed_mid_write(sidecar: Callable[..., SidecarHandle], persistent_redis: Any) -> None:
    """Redis is frozen while write-through copies are in flight, then SIGKILLed under them
    (its connections reset mid-value) and restarted from its append-only file. The movers
    give up at once, the host tier serves every chunk intact, and the other node finds
    each chunk whole or not at all: the chunks Redis took before the freeze, whole."""
    redis_server = persistent_redis
    node1 = sidecar(*remote_flags(redis_server.url), "--remote-timeout", "10s")
    node2 = sidecar(*remote_flags(redis_server.url))
    writer, reader = node1.client(namespaces=[NS]), node2.client(namespaces=[NS])
    first = chunk_hashes(3, seed=40)
    assert store(writer, first) == 3
    assert quiet(node1)["tiers"]["remote"]["stored_chunks"] == 3

    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        hashes = chunk_hashes(12, seed=41)           # 3 MiB: more than the sockets buffer
        assert store(writer, hashes) == 12
        wait_for(lambda: stats(node1)["tier_movers"]["in_flight"] > 0, 10, "copies to Redis in flight")
    finally:
        redis_server.kill()                          # a stopped process dies all the same
    s = quiet(node1)                                 # well before the 10 s timeout: the resets end them
    assert s["tiers"]["remote"]["errors"] >= 1
    assert load(writer, first + hashes) == [payload(x) for x in first + hashes]
    assert_no_leaks(node1, CHUNK_BYTES)

    redis_server.start()
    got = load(reader, first + hashes, timeout=10)
    assert len(got) >= 3, "what Redis had taken before the freeze survived"
    assert got == [payload(x) for x in (first + hashes)[:len(got)]], "whole chunks or misses, nothing else"
    assert quiet(node2)["tiers"]["remote"]["corrupt"] == 0
    assert_no_leaks(node2, CHUNK_BYTES)
