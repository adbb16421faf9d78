"""The tier hierarchy in a real sidecar: disk and remote tiers behind the host pool.

Clients here write chunk bytes straight into the shared host pool (as workers do) and read
them back through pinned LOOKUPs; every byte that comes back is compared with what was
written. "Two nodes" are two sidecars with their own run dirs sharing one redis-server.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from lmkv_mp.wire import protocol as P
from lmkv_mp.engine.client import SidecarClient

from tests.conftest import SidecarHandle, stats, wait_for

pytestmark = pytest.mark.slow

CHUNK_BYTES = 256 << 10
NS = P.NamespaceInfo(b"\x5a" * 16, CHUNK_BYTES, "tier-test")
SMALL_HOST = ("--host-pool-size", "8MiB", "--slab-size", "1MiB")   # 4 slabs: 16 chunks at most


def chunk_hashes(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(16) for _ in range(n)]


def payload(h: bytes) -> bytes:
    """The bytes every test stores under hash ``h`` (derived from it, so any reader can check)."""
    return np.random.default_rng(int.from_bytes(h[:8], "little")).bytes(CHUNK_BYTES)


def store(client: SidecarClient, hashes: list[bytes], checksums: bool = False, tamper: int | None = None) -> int:
    """Reserve, write and commit ``hashes``; the number committed. ``checksums``: send each
    payload's checksum (``--verify on``); ``tamper``: flip a bit of that chunk after its
    checksum was taken, as a stray write would."""
    from lmkv_mp.wire.checksum import checksum

    r = client.reserve(NS.id, b"".join(hashes))
    assert r is not None, "sidecar unreachable"
    host = client.host_tensor()
    assert host is not None
    for i in r.writable():
        off = int(r.offsets[i])
        host[off:off + CHUNK_BYTES] = torch.frombuffer(bytearray(payload(hashes[i])), dtype=torch.uint8)
    if tamper is not None:
        host[int(r.offsets[tamper]) + 7] ^= 0x01
    if not r.lease_id:
        return 0
    if checksums:
        return client.commit(r.lease_id, b"".join(hashes), [checksum(payload(x)) for x in hashes])
    return client.commit(r.lease_id)


def load(client: SidecarClient, hashes: list[bytes], timeout: float = 20.0) -> list[bytes]:
    """Pinned LOOKUPs until nothing is pending (or ``timeout``); the leading hits' bytes."""
    def settled() -> Any:
        found = client.lookup([NS.id], b"".join(hashes), pin=True)
        if found.pending and found.hits < len(hashes):
            if found.lease_id:
                client.release(found.lease_id)
            return None
        return found

    found = wait_for(settled, timeout, "pending chunks to arrive from the lower tiers")
    host = client.host_tensor()
    assert host is not None
    out = [bytes(host[int(o):int(o) + CHUNK_BYTES].numpy()) for o in found.offsets[0]] if found.hits else []
    if found.lease_id:
        client.release(found.lease_id)
    return out


def tier(handle: SidecarHandle, name: str) -> dict[str, Any]:
    return stats(handle)["tiers"][name]


def quiet(handle: SidecarHandle) -> dict[str, Any]:
    """A snapshot taken once no tier copy is in flight."""
    return wait_for(lambda: (s := stats(handle))["tier_movers"]["in_flight"] == 0 and s, 20, "tier copies to finish")


def disk_flags(disk: Path, policy: str = "write-through") -> tuple[str, ...]:
    return ("--disk-dir", str(disk), "--disk-size", "64MiB", "--write-policy", policy)


@pytest.fixture
def disk_dir() -> Any:
    d = Path(tempfile.mkdtemp(prefix="lmkv-disk-", dir="/tmp"))
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    d.rmdir()


def test_disk_tier_survives_a_cold_restart(sidecar: Callable[..., SidecarHandle], disk_dir: Path) -> None:
    first = sidecar(*disk_flags(disk_dir))
    hashes = chunk_hashes(6, seed=1)
    assert store(first.client(namespaces=[NS]), hashes) == 6
    assert quiet(first)["tiers"]["disk"]["stored_chunks"] == 6
    first.close()  # host pool gone (unlinked); the disk dir stays

    second = sidecar(*disk_flags(disk_dir))
    assert tier(second, "disk")["entries"] == 6
    reader = second.client(namespaces=[NS])
    first_ask = reader.lookup([NS.id], b"".join(hashes))
    assert first_ask.hits == 0 and first_ask.pending == 6, "a cold host pool: all six are on their way from disk"
    got = load(reader, hashes)
    assert got == [payload(h) for h in hashes]
    s = quiet(second)
    assert s["tiers"]["disk"]["hit_chunks"] == s["tiers"]["disk"]["prefetches"] == 6
    assert s["tiers"]["disk"]["corrupt"] == 0


@pytest.mark.parametrize("policy", ["write-through", "write-back"])
def test_host_pressure_evicts_to_disk_and_promotes_back(policy: str, sidecar: Callable[..., SidecarHandle],
                                                        disk_dir: Path) -> None:
    h = sidecar(*SMALL_HOST, *disk_flags(disk_dir, policy))
    writer = h.client(namespaces=[NS])
    hashes = chunk_hashes(40, seed=2)   # 10 MiB of chunks through an 8 MiB pool
    for i in range(0, len(hashes), 2):
        assert store(writer, hashes[i:i + 2]) == 2
        quiet(h)  # a writer faster than the disk loses write-back copies; this test is about placement
    s = quiet(h)
    assert s["evictions"] > 0, "the pool must have been under pressure"
    assert s["evicted_dirty"] == 0, "every evicted chunk had a copy on disk first"
    assert s["tiers"]["disk"]["entries"] >= len(hashes) - 16
    # The oldest chunks left the host pool; asking for them brings them back from disk.
    assert writer.lookup([NS.id], b"".join(hashes[:4])).hits < 4
    assert load(writer, hashes[:4]) == [payload(x) for x in hashes[:4]]
    assert quiet(h)["tiers"]["disk"]["hit_chunks"] >= 1


def test_a_corrupted_disk_record_is_never_served(sidecar: Callable[..., SidecarHandle], disk_dir: Path) -> None:
    first = sidecar(*disk_flags(disk_dir))
    hashes = chunk_hashes(5, seed=3)
    store(first.client(namespaces=[NS]), hashes)
    quiet(first)
    first.close()
    victim = hashes[2].hex()
    (path,) = [p for p in disk_dir.rglob("*") if p.is_file() and victim in p.name]
    with open(path, "r+b") as f:   # one flipped bit in the payload
        f.seek(os.path.getsize(path) - 1000)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))

    second = sidecar(*disk_flags(disk_dir))
    got = load(second.client(namespaces=[NS]), hashes)
    assert got == [payload(x) for x in hashes[:2]], "the prefix stops before the corrupt chunk"
    s = quiet(second)
    assert s["tiers"]["disk"]["corrupt"] == 1
    assert not path.exists(), "a corrupt record is deleted"


def test_vllm_scheduler_waits_for_pending_chunks_then_claims_them(sidecar: Callable[..., SidecarHandle],
                                                                  disk_dir: Path) -> None:
    from lmkv_mp.integration.vllm_scheduler import SchedulerSide
    from tests.integration.test_vllm_scheduler import BLOCK, CHUNK, TOKENS, namespaces, request, store_chunks

    first = sidecar(*disk_flags(disk_dir))
    store_chunks(first, TOKENS, 5)
    quiet(first)
    first.close()
    second = sidecar(*disk_flags(disk_dir))
    # The engine's workers HELLO with their namespaces at start-up; that tells a fresh sidecar
    # the chunk size a promotion needs.
    assert second.client("worker", namespaces=[P.NamespaceInfo(ns.id, 4096, "t") for ns in namespaces()]).connect()
    s = SchedulerSide(second.client("scheduler"), namespaces(), CHUNK, BLOCK, prefetch_timeout=30.0)
    req = request("r1", TOKENS)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False), "chunks on disk: ask again later"
    assert stats(second)["leases"]["read"] == 0, "no lease is held while waiting"
    claimed = wait_for(lambda: (r := s.get_num_new_matched_tokens(req, 0))[0] is not None and r, 20,
                       "the scheduler to claim the promoted chunks")
    assert claimed == (4 * CHUNK, True)
    assert stats(second)["leases"]["read"] == 1


def remote_flags(url: str, policy: str = "write-through") -> tuple[str, ...]:
    return ("--remote-url", url, "--remote-timeout", "300ms", "--write-policy", policy)


def test_two_nodes_share_chunks_through_redis(sidecar: Callable[..., SidecarHandle], redis_server: Any) -> None:
    node1 = sidecar(*remote_flags(redis_server.url))
    node2 = sidecar(*remote_flags(redis_server.url))
    hashes = chunk_hashes(5, seed=4)
    assert store(node1.client(namespaces=[NS]), hashes) == 5
    assert quiet(node1)["tiers"]["remote"]["stored_chunks"] == 5
    reader = node2.client(namespaces=[NS])
    first_ask = reader.lookup([NS.id], b"".join(hashes))
    assert first_ask.hits == 0 and first_ask.pending == 5, "node 2 probes redis and reports all five on their way"
    assert load(reader, hashes) == [payload(h) for h in hashes]
    s = quiet(node2)
    assert s["tiers"]["remote"]["hit_chunks"] == 5 and s["tiers"]["remote"]["corrupt"] == 0
    # A chunk redis never had is a plain miss after the probe: nothing pending forever.
    other = chunk_hashes(2, seed=5)
    assert load(reader, other) == []


def test_redis_down_means_misses_without_stalls_and_recovery_when_back(
        sidecar: Callable[..., SidecarHandle], redis_server: Any) -> None:
    import time

    node1 = sidecar(*remote_flags(redis_server.url))
    node2 = sidecar(*remote_flags(redis_server.url))
    writer, reader = node1.client(namespaces=[NS]), node2.client(namespaces=[NS])
    redis_server.kill()
    lost = chunk_hashes(3, seed=6)
    t0 = time.monotonic()
    assert store(writer, lost) == 3, "stores into the host tier go on while redis is down"
    assert load(reader, lost, timeout=10) == [], "nothing to find anywhere"
    assert time.monotonic() - t0 < 5, "a dead redis costs bounded time, never a stall"
    assert load(writer, lost) == [payload(h) for h in lost], "node 1's own host tier still serves"
    s1 = quiet(node1)
    assert s1["tiers"]["remote"]["errors"] >= 1
    redis_server.start()
    attempt = iter(range(100, 1000))

    def shared() -> bool:  # fresh chunks each try: the tier may still be in its back-off
        back = chunk_hashes(3, seed=next(attempt))
        store(writer, back)
        quiet(node1)
        return load(reader, back) == [payload(h) for h in back]

    wait_for(shared, 30, "chunks to flow through redis again once it is back", interval=0.3)


def test_clear_reaches_the_disk_tier(sidecar: Callable[..., SidecarHandle], disk_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("s3cret-admin-token\n")
    token.chmod(0o600)
    h = sidecar(*disk_flags(disk_dir), "--admin-token-file", str(token))
    c = h.client(namespaces=[NS])
    hashes = chunk_hashes(4, seed=8)
    store(c, hashes)
    assert quiet(h)["tiers"]["disk"]["entries"] == 4
    assert c.clear(NS.id, token=b"s3cret-admin-token") == 4
    after = c.lookup([NS.id], b"".join(hashes))
    assert after.hits == 0 and after.pending == 0, "cleared: not in host memory, and never brought back from disk"
    wait_for(lambda: tier(h, "disk")["entries"] == 0, 10, "the disk records to be deleted")
    assert not [p for p in disk_dir.rglob("*") if p.is_file() and p.name != "lock"]


def test_host_pool_on_a_file_comes_back_under_a_new_run_dir(sidecar: Callable[..., SidecarHandle],
                                                             tmp_path: Path) -> None:
    """--host-pool-path on a DAX or tmpfs mount: the pool outlives the run dir (a reboot on
    persistent memory wipes /run, not the pool file), and only one sidecar may use it."""
    pool = tmp_path / "pool"
    first = sidecar("--host-pool-path", str(pool))
    hashes = chunk_hashes(3, seed=9)
    assert store(first.client(namespaces=[NS]), hashes) == 3
    rival = sidecar("--host-pool-path", str(pool), ready=False)
    assert rival.proc is not None and rival.proc.wait(60) == 1
    assert "give each sidecar its own --host-pool-path" in rival.log()
    first.kill()                                 # no clean exit: nothing unlinks the pool file
    second = sidecar("--host-pool-path", str(pool))
    assert second.run_dir != first.run_dir
    assert load(second.client(namespaces=[NS]), hashes) == [payload(h) for h in hashes]


def test_verify_on_a_chunk_whose_host_bytes_changed_is_dropped_not_copied_down(
        sidecar: Callable[..., SidecarHandle], disk_dir: Path) -> None:
    """With --verify on, the mover checks a chunk's host bytes against its COMMIT checksum
    before copying it down: bytes that changed in the pool are dropped, never written to a
    lower tier with a fresh (valid) record checksum."""
    h = sidecar(*disk_flags(disk_dir), "--verify", "on")
    c = h.client(namespaces=[NS])
    hashes = chunk_hashes(3, seed=11)
    assert store(c, hashes, checksums=True, tamper=1) == 3
    s = quiet(h)
    assert s["tier_movers"]["corrupt_found"] == 1
    assert s["tiers"]["disk"]["entries"] == 2 and s["tiers"]["host"]["entries"] == 2
    assert c.lookup([NS.id], b"".join(hashes)).hits == 1, "the changed chunk is a miss at once"
    h.close()
    cold = sidecar(*disk_flags(disk_dir), "--verify", "on")
    reader = cold.client(namespaces=[NS])
    assert load(reader, hashes[:1]) == [payload(hashes[0])]
    assert load(reader, hashes) == [payload(hashes[0])], "the disk never got the changed chunk"
    assert load(reader, hashes[2:]) == [payload(hashes[2])]


def test_verify_on_promoted_chunks_carry_their_checksum(sidecar: Callable[..., SidecarHandle],
                                                        disk_dir: Path) -> None:
    from lmkv_mp.wire.checksum import checksum

    first = sidecar(*disk_flags(disk_dir), "--verify", "on")
    c = first.client(namespaces=[NS])
    hashes = chunk_hashes(3, seed=10)
    assert store(c, hashes, checksums=True) == 3
    quiet(first)
    first.close()
    second = sidecar(*disk_flags(disk_dir), "--verify", "on")
    reader = second.client(namespaces=[NS])
    assert load(reader, hashes) == [payload(h) for h in hashes]
    found = reader.lookup([NS.id], b"".join(hashes), pin=True)
    assert found.checksums[0].tolist() == [checksum(payload(h)) for h in hashes], "hashed by the mover"
    reader.release(found.lease_id)
