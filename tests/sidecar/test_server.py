"""The sidecar's dispatch, driven in-process through :meth:`Sidecar.handle`.

A real :class:`Sidecar` (real shm segment, bound sockets, fresh run dir) whose loop is not
running: each test hands it request frames and decodes the reply frames, so lease expiry
and restarts are exercised without waiting (``reap`` is called with a future clock).
The loop, the sockets and the processes around it are covered by test_multiprocess.py,
tests/faults/ and test_cli.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from lmkv_mp.wire import protocol as P
from lmkv_mp.config import load_sidecar_config
from lmkv_mp.memory import shm_name_for
from lmkv_mp.sidecar.handlers import MAX_LEASES_PER_CLIENT
from lmkv_mp.sidecar.server import Sidecar, may_precede_hello, register
from lmkv_mp.sidecar.startup import StartupError

from tests.conftest import unlink_shm

NS_A = bytes(range(16))
NS_B = bytes(range(16, 32))
CHUNK = 64 << 10


def hashes(*ids: int) -> bytes:
    return b"".join(i.to_bytes(16, "little") for i in ids)


class Harness:
    """One in-process sidecar on a fresh run dir, and helpers to talk to it."""

    def __init__(self, run_dir: Path, *flags: str) -> None:
        self.run_dir = run_dir
        self.flags = flags
        self.server = self._new()

    def _new(self) -> Sidecar:
        cfg = load_sidecar_config(["--run-dir", str(self.run_dir), "--host-pool-size", "64MiB", "--slab-size",
                                   "4MiB", "--lease-timeout", "1s", "--heartbeat-interval", "200ms",
                                   "--metrics-port", "0", *self.flags], env={})
        return Sidecar(cfg)

    def restart(self) -> None:
        """Close (the segment stays, as after a crash or a stop without unlink) and start anew."""
        self.server.close()
        self.server = self._new()

    def send(self, ident: bytes, msg: P.Request, stats_only: bool = False) -> P.Reply:
        return P.decode_reply(msg.OP, self.server.handle(ident, P.encode_request(msg), stats_only))

    def ok(self, ident: bytes, msg: P.Request) -> P.Reply:
        reply = self.send(ident, msg)
        assert not isinstance(reply, P.ErrorReply), reply
        assert reply.req_id == msg.req_id and reply.boot_id == self.server.boot_id
        return reply

    def error(self, ident: bytes, msg: P.Request, code: P.ErrorCode, stats_only: bool = False) -> P.ErrorReply:
        reply = self.send(ident, msg, stats_only)
        assert isinstance(reply, P.ErrorReply), reply
        assert reply.code == code, (P.ErrorCode(reply.code).name, reply.message)
        assert reply.req_id == msg.req_id and reply.boot_id == self.server.boot_id and reply.message
        return reply

    def hello(self, ident: bytes, *namespaces: bytes, role: str = "worker", chunk: int = CHUNK) -> P.HelloReply:
        reply = self.ok(ident, P.Hello(1, P.PROTOCOL_VERSION, role, 123, ident.decode(),
                                       [P.NamespaceInfo(ns, chunk, f"ns-{ns[0]}") for ns in namespaces]))
        assert isinstance(reply, P.HelloReply)
        return reply

    def store(self, ident: bytes, ns: bytes, packed: bytes) -> P.ReserveReply:
        r = self.ok(ident, P.Reserve(2, ns, packed))
        assert isinstance(r, P.ReserveReply)
        assert set(r.status) == {P.SlotStatus.WRITE}
        c = self.ok(ident, P.Commit(3, r.lease_id))
        assert isinstance(c, P.CommitReply) and c.committed == len(packed) // 16
        return r

    def lookup(self, ident: bytes, namespaces: list[bytes], packed: bytes, pin: bool = False) -> P.LookupReply:
        r = self.ok(ident, P.Lookup(4, namespaces, packed, pin))
        assert isinstance(r, P.LookupReply)
        return r

    def stats(self) -> dict:
        """The snapshot, asked on the stats socket (as lmkv-stats does)."""
        r = self.send(b"stats-reader", P.Stats(5), stats_only=True)
        assert isinstance(r, P.StatsReply), r
        return r.snapshot

    def close(self) -> None:
        self.server.close()
        unlink_shm(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def sc() -> Iterator[Harness]:
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")))
    yield h
    h.close()


def test_hello_describes_the_sidecar(sc: Harness) -> None:
    r = sc.hello(b"w1", NS_A)
    assert r.client_id >= 1 and r.chunk_tokens == 256 and len(r.hash_key) >= 16
    assert r.lease_timeout == 1.0 and r.heartbeat_interval == 0.2
    (region,) = r.regions
    assert region.kind == "shm" and region.name == shm_name_for(sc.run_dir) and region.size == 64 << 20
    assert len(region.uuid) == 16
    again = sc.hello(b"w1", NS_B)
    assert again.client_id == r.client_id, "a re-HELLO keeps the client's identity"
    assert sc.stats()["clients"] == {"worker": 1}


def test_hello_rejects_bad_versions_roles_and_conflicting_namespaces(sc: Harness) -> None:
    sc.error(b"w", P.Hello(7, P.PROTOCOL_VERSION + 1, "worker"), P.ErrorCode.VERSION)
    sc.error(b"w", P.Hello(8, P.PROTOCOL_VERSION, "root"), P.ErrorCode.BAD_REQUEST)
    sc.hello(b"w1", NS_A)
    sc.error(b"w2", P.Hello(9, P.PROTOCOL_VERSION, "worker", 1, "",
                            [P.NamespaceInfo(NS_A, CHUNK * 2)]), P.ErrorCode.CONFLICT)
    # All or nothing: a HELLO refused for its second namespace declares neither.
    sc.error(b"w3", P.Hello(10, P.PROTOCOL_VERSION, "worker", 1, "",
                            [P.NamespaceInfo(NS_B, CHUNK), P.NamespaceInfo(NS_A, CHUNK * 2)]), P.ErrorCode.CONFLICT)
    sc.error(b"w3", P.Hello(11, P.PROTOCOL_VERSION, "worker", 1, "",
                            [P.NamespaceInfo(NS_B, CHUNK), P.NamespaceInfo(NS_B, CHUNK * 2)]), P.ErrorCode.CONFLICT)
    assert sc.server.index.chunk_bytes(NS_B) is None
    assert sc.stats()["errors_by_code"] == {"VERSION": 1, "BAD_REQUEST": 1, "CONFLICT": 3}


def test_requests_before_hello_are_not_registered(sc: Harness) -> None:
    for msg in (P.Lookup(3, [NS_A], hashes(1)), P.Reserve(4, NS_A, hashes(1)), P.Commit(5, 1),
                P.Release(6, 1), P.Ping(7)):
        sc.error(b"stranger", msg, P.ErrorCode.NOT_REGISTERED)
    sc.ok(b"stranger", P.Stats(8))  # stats need no HELLO


@pytest.mark.parametrize("msg, stats_only, token, ok", [
    (P.Hello(1, P.PROTOCOL_VERSION, "worker"), False, b"t", True),
    (P.Stats(1), True, b"t", True),
    (P.Stats(1), False, None, True),
    (P.Stats(1), False, b"t", False),      # the snapshot names the node's models: HELLO with the token first
    (P.Ping(1), False, None, False),
    (P.Lookup(1, [NS_A], b""), False, None, False),
])
def test_what_may_come_before_hello(msg: P.Request, stats_only: bool, token: bytes | None, ok: bool) -> None:
    assert may_precede_hello(msg, stats_only, token) is ok


def test_the_loop_checks_its_handler_table_at_start(sc: Harness) -> None:
    """Each op's handler must take the request type the op decodes to; a table that does
    not (or misses an op) fails when the sidecar starts, not on the first such request."""
    table = sc.server.handlers.table()
    assert register(table) == table
    with pytest.raises(TypeError, match="PING handler .* must take"):
        register({**table, P.Op.PING: table[P.Op.STATS]})
    with pytest.raises(TypeError, match="missing for .*CLEAR"):
        register({op: h for op, h in table.items() if op is not P.Op.CLEAR})


def test_store_lookup_pin_release(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.hello(b"sched", role="scheduler")
    res = sc.store(b"w1", NS_A, hashes(1, 2, 3))
    offsets = res.offsets.tolist()
    assert len(set(offsets)) == 3

    assert sc.lookup(b"sched", [NS_A], hashes(1, 2, 3, 4)).hits == 3
    assert sc.lookup(b"sched", [NS_A], hashes(1, 9, 3)).hits == 1, "hits are the leading run only"
    assert sc.lookup(b"sched", [NS_A], hashes(9, 2, 3)).hits == 0
    assert sc.lookup(b"sched", [NS_B], hashes(1, 2, 3)).hits == 0, "another namespace never hits"

    pinned = sc.lookup(b"sched", [NS_A], hashes(1, 2, 3), pin=True)
    assert pinned.hits == 3 and pinned.lease_id
    assert pinned.offsets[0].tolist() == offsets
    assert pinned.gpu_regions == [] and pinned.gpu_offsets == [], "no GPU tier: no GPU copies"
    assert sc.stats()["leases"] == {"read": 1, "write": 0}

    again = sc.ok(b"w1", P.Reserve(6, NS_A, hashes(1, 2, 3, 4)))
    assert isinstance(again, P.ReserveReply)
    assert list(again.status) == [P.SlotStatus.PRESENT] * 3 + [P.SlotStatus.WRITE]
    sc.ok(b"w1", P.Release(7, again.lease_id))

    sc.error(b"w1", P.Release(8, pinned.lease_id), P.ErrorCode.UNKNOWN_LEASE)  # not w1's lease
    rel = sc.ok(b"sched", P.Release(9, pinned.lease_id))
    assert isinstance(rel, P.ReleaseReply) and rel.released == 3
    sc.error(b"sched", P.Release(10, pinned.lease_id), P.ErrorCode.UNKNOWN_LEASE)

    s = sc.stats()
    assert s["leases"] == {"read": 0, "write": 0}
    assert s["tiers"]["host"]["entries"] == 3
    assert (s["lookups"], s["lookup_chunks"], s["hit_chunks"]) == (5, 16, 7)
    assert (s["stores"], s["loads"], s["loaded_bytes"]) == (3, 3, 3 * CHUNK)


def test_lookup_counts_chunks_committed_in_every_namespace(sc: Harness) -> None:
    sc.hello(b"r0", NS_A)
    sc.hello(b"r1", NS_B)
    sc.store(b"r0", NS_A, hashes(1, 2, 3))
    sc.store(b"r1", NS_B, hashes(1, 2))
    assert sc.lookup(b"r0", [NS_A, NS_B], hashes(1, 2, 3)).hits == 2
    pinned = sc.lookup(b"r0", [NS_A, NS_B], hashes(1, 2, 3), pin=True)
    assert pinned.hits == 2 and [len(o) for o in pinned.offsets] == [2, 2]
    assert not set(pinned.offsets[0]) & set(pinned.offsets[1])


def test_writing_chunks_are_invisible_and_busy_for_other_writers(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.hello(b"w2", NS_A)
    r1 = sc.ok(b"w1", P.Reserve(1, NS_A, hashes(1, 2)))
    assert isinstance(r1, P.ReserveReply)
    assert sc.lookup(b"w2", [NS_A], hashes(1, 2)).hits == 0
    r2 = sc.ok(b"w2", P.Reserve(2, NS_A, hashes(1, 2)))
    assert isinstance(r2, P.ReserveReply)
    assert list(r2.status) == [P.SlotStatus.BUSY] * 2 and r2.lease_id == 0
    sc.error(b"w2", P.Commit(3, r1.lease_id), P.ErrorCode.UNKNOWN_LEASE)
    # Committing only the first chunk ends the lease and frees the other slot.
    c = sc.ok(b"w1", P.Commit(4, r1.lease_id, hashes(1)))
    assert isinstance(c, P.CommitReply) and c.committed == 1
    assert sc.lookup(b"w2", [NS_A], hashes(1, 2)).hits == 1
    s = sc.stats()
    assert s["aborted_writes"] == 1 and s["tiers"]["host"]["entries"] == 1


def test_reserve_needs_a_declared_namespace(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.hello(b"w2", NS_B)
    sc.error(b"w1", P.Reserve(1, NS_B, hashes(1)), P.ErrorCode.UNKNOWN_NAMESPACE)  # declared by w2 only
    sc.error(b"w1", P.Reserve(2, bytes(16), hashes(1)), P.ErrorCode.UNKNOWN_NAMESPACE)


def test_silent_client_is_reaped_with_its_leases(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.hello(b"sched", role="scheduler")
    baseline = sc.stats()["tiers"]["host"]["used_bytes"]
    sc.store(b"w1", NS_A, hashes(1))
    sc.ok(b"w1", P.Reserve(1, NS_A, hashes(2, 3)))
    pinned = sc.lookup(b"sched", [NS_A], hashes(1), pin=True)
    assert sc.stats()["leases"] == {"read": 1, "write": 1}

    sc.server.reap(time.monotonic() + 0.5)  # within the lease timeout: nothing happens
    assert sc.stats()["leases"] == {"read": 1, "write": 1}
    sc.server.reap(time.monotonic() + 5)
    s = sc.stats()
    assert s["leases"] == {"read": 0, "write": 0} and s["clients"] == {}
    assert s["tiers"]["host"]["entries"] == 1 and s["tiers"]["host"]["used_bytes"] > baseline
    sc.error(b"sched", P.Release(2, pinned.lease_id), P.ErrorCode.NOT_REGISTERED)
    sc.hello(b"w1", NS_A)
    r = sc.ok(b"w1", P.Reserve(3, NS_A, hashes(2, 3)))
    assert isinstance(r, P.ReserveReply) and list(r.status) == [P.SlotStatus.WRITE] * 2


def hello_as(h: Harness, ident: bytes, pid: int) -> None:
    h.ok(ident, P.Hello(1, P.PROTOCOL_VERSION, "worker", pid, ident.decode(), [P.NamespaceInfo(NS_A, CHUNK, "a")]))


def test_a_stopped_writers_slots_are_parked_until_its_stale_commit(sc: Harness) -> None:
    """A writer reaped while its process lives may only be stopped mid-copy: its slots go to
    no one until it says it is done (its stale COMMIT), so its late writes cannot land in
    another writer's chunk."""
    hello_as(sc, b"w1", os.getpid())
    r = sc.ok(b"w1", P.Reserve(1, NS_A, hashes(1, 2)))
    assert isinstance(r, P.ReserveReply)
    mine = set(r.offsets.tolist())
    sc.server.reap(time.monotonic() + 5)
    s = sc.stats()
    assert s["parked_slots"] == 2 and s["leases"] == {"read": 0, "write": 0}
    hello_as(sc, b"w2", os.getpid() + 10**7)   # no such process
    other = sc.ok(b"w2", P.Reserve(2, NS_A, hashes(1, 2)))
    assert isinstance(other, P.ReserveReply) and list(other.status) == [P.SlotStatus.WRITE] * 2
    assert not mine & set(other.offsets.tolist()), "the parked slots are nobody else's"
    used = sc.stats()["tiers"]["host"]["used_bytes"]

    hello_as(sc, b"w1", os.getpid())          # continued: re-registers, then its stale COMMIT
    sc.error(b"w1", P.Commit(3, r.lease_id), P.ErrorCode.UNKNOWN_LEASE)
    s = sc.stats()
    assert s["parked_slots"] == 0 and s["tiers"]["host"]["used_bytes"] < used, "freed now"


def test_parked_slots_go_when_the_writer_is_gone_or_after_a_while(sc: Harness) -> None:
    from lmkv_mp.sidecar.clients import PARK_MAX_SECONDS

    child = subprocess.Popen(["sleep", "60"])
    try:
        hello_as(sc, b"w1", child.pid)
        sc.ok(b"w1", P.Reserve(1, NS_A, hashes(1)))
        hello_as(sc, b"w2", os.getpid())
        sc.ok(b"w2", P.Reserve(2, NS_A, hashes(2)))
        now = time.monotonic()
        sc.server.reap(now + 5)
        assert sc.stats()["parked_slots"] == 2
    finally:
        child.kill()
        child.wait()
    sc.server.reap(now + 6)
    assert sc.stats()["parked_slots"] == 1, "the dead writer's slot is freed"
    sc.server.reap(now + 5 + PARK_MAX_SECONDS + 1)
    assert sc.stats()["parked_slots"] == 0, "and a stopped one's after PARK_MAX_SECONDS"


def test_a_dead_writers_slots_are_freed_when_it_is_reaped(sc: Harness) -> None:
    hello_as(sc, b"w1", os.getpid() + 10**7)   # no such process
    sc.ok(b"w1", P.Reserve(1, NS_A, hashes(1)))
    sc.server.reap(time.monotonic() + 5)
    s = sc.stats()
    assert s["parked_slots"] == 0 and s["tiers"]["host"]["entries"] == 0


def test_heartbeat_keeps_a_client(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.ok(b"w1", P.Reserve(1, NS_A, hashes(1)))
    ping = sc.ok(b"w1", P.Ping(2))
    assert isinstance(ping, P.PingReply) and ping.leases == 1
    sc.server.reap(time.monotonic() + 0.5)
    assert sc.ok(b"w1", P.Ping(3)).leases == 1  # type: ignore[union-attr]


def test_stats_socket_answers_stats_only(sc: Harness) -> None:
    sc.error(b"x", P.Hello(1, P.PROTOCOL_VERSION, "worker"), P.ErrorCode.UNKNOWN_OP, stats_only=True)
    sc.error(b"x", P.Lookup(2, [NS_A], hashes(1)), P.ErrorCode.UNKNOWN_OP, stats_only=True)
    assert isinstance(sc.send(b"x", P.Stats(3), stats_only=True), P.StatsReply)


def test_clear_is_refused_without_an_admin_token(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.store(b"w1", NS_A, hashes(1))
    sc.error(b"w1", P.Clear(1), P.ErrorCode.UNAUTHORIZED)
    sc.error(b"w1", P.Clear(2, b"guess"), P.ErrorCode.UNAUTHORIZED)
    assert sc.lookup(b"w1", [NS_A], hashes(1)).hits == 1


def test_clear_with_the_admin_token(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("s3cret\n")
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), "--admin-token-file", str(token))
    try:
        h.hello(b"w1", NS_A, NS_B)
        h.store(b"w1", NS_A, hashes(1, 2))
        h.store(b"w1", NS_B, hashes(1))
        pinned = h.lookup(b"w1", [NS_A], hashes(1, 2), pin=True)
        h.error(b"w1", P.Clear(1, b"wrong", NS_A), P.ErrorCode.UNAUTHORIZED)
        cleared = h.ok(b"w1", P.Clear(2, b"s3cret", NS_A))
        assert isinstance(cleared, P.ClearReply) and cleared.dropped == 2
        assert h.lookup(b"w1", [NS_A], hashes(1, 2)).hits == 0, "a cleared pinned entry vanishes at once"
        assert h.lookup(b"w1", [NS_B], hashes(1)).hits == 1
        used = h.stats()["tiers"]["host"]["used_bytes"]
        h.ok(b"w1", P.Release(3, pinned.lease_id))
        assert h.stats()["tiers"]["host"]["used_bytes"] < used, "freed when the last pin goes"
    finally:
        h.close()


def test_lease_quota(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.store(b"w1", NS_A, hashes(1))
    leases = [sc.lookup(b"w1", [NS_A], hashes(1), pin=True).lease_id for _ in range(MAX_LEASES_PER_CLIENT)]
    sc.error(b"w1", P.Lookup(1, [NS_A], hashes(1), True), P.ErrorCode.QUOTA)
    sc.error(b"w1", P.Reserve(2, NS_A, hashes(2)), P.ErrorCode.QUOTA)
    assert sc.lookup(b"w1", [NS_A], hashes(1)).hits == 1, "unpinned lookups need no lease"
    sc.ok(b"w1", P.Release(3, leases[0]))
    assert sc.lookup(b"w1", [NS_A], hashes(1), pin=True).hits == 1


def test_internal_error_becomes_a_reply(sc: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    sc.hello(b"w1", NS_A)

    def broken(*_: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(sc.server.index, "lookup", broken)
    err = sc.error(b"w1", P.Lookup(1, [NS_A], hashes(1)), P.ErrorCode.INTERNAL)
    assert "boom" in err.message
    monkeypatch.undo()
    assert sc.lookup(b"w1", [NS_A], hashes(1)).hits == 0
    assert sc.stats()["errors_by_code"] == {"INTERNAL": 1}


def test_warm_restart_keeps_committed_chunks_only(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.store(b"w1", NS_A, hashes(1, 2))
    res = sc.ok(b"w1", P.Reserve(1, NS_A, hashes(3, 4)))  # never committed
    assert isinstance(res, P.ReserveReply)
    old_boot = sc.server.boot_id
    offsets = sc.lookup(b"w1", [NS_A], hashes(1, 2), pin=True).offsets[0].tolist()

    sc.restart()
    assert sc.server.boot_id != old_boot
    s = sc.stats()
    assert s["tiers"]["host"]["entries"] == 2 and s["leases"] == {"read": 0, "write": 0}
    sc.error(b"w1", P.Lookup(2, [NS_A], hashes(1)), P.ErrorCode.NOT_REGISTERED)
    sc.hello(b"w1", NS_A)
    pinned = sc.lookup(b"w1", [NS_A], hashes(1, 2, 3, 4), pin=True)
    assert pinned.hits == 2 and pinned.offsets[0].tolist() == offsets
    r = sc.ok(b"w1", P.Reserve(3, NS_A, hashes(3, 4)))
    assert isinstance(r, P.ReserveReply) and list(r.status) == [P.SlotStatus.WRITE] * 2


def test_second_sidecar_on_the_same_run_dir_is_refused(sc: Harness) -> None:
    with pytest.raises(StartupError, match="lock"):
        sc._new()
    sc.hello(b"sched", role="scheduler")  # the first sidecar is unharmed
    assert sc.lookup(b"sched", [NS_A], hashes(1)).hits == 0


# -- integrity (--verify on) -------------------------------------------------------------------


@pytest.fixture
def verifying() -> Iterator[Harness]:
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), "--verify", "on")
    yield h
    h.close()


def test_verify_needs_a_checksum_per_chunk_at_commit(verifying: Harness) -> None:
    h = verifying
    assert h.hello(b"w1", NS_A).verify
    used = h.stats()["tiers"]["host"]["used_bytes"]
    r = h.ok(b"w1", P.Reserve(1, NS_A, hashes(1, 2)))
    assert isinstance(r, P.ReserveReply)
    err = h.error(b"w1", P.Commit(2, r.lease_id), P.ErrorCode.BAD_REQUEST)
    assert "--verify on" in err.message
    s = h.stats()
    assert s["leases"] == {"read": 0, "write": 0}, "the lease ended with the refusal"
    assert s["tiers"]["host"]["used_bytes"] == used and s["tiers"]["host"]["entries"] == 0
    h.error(b"w1", P.Commit(3, r.lease_id, hashes(1), P.pack_u64([7])), P.ErrorCode.UNKNOWN_LEASE)

    r = h.ok(b"w1", P.Reserve(4, NS_A, hashes(1, 2)))
    c = h.ok(b"w1", P.Commit(5, r.lease_id, hashes(1, 2), P.pack_u64([11, 22])))  # type: ignore[union-attr]
    assert c.committed == 2  # type: ignore[union-attr]
    pinned = h.lookup(b"w1", [NS_A], hashes(1, 2), pin=True)
    assert [x.tolist() for x in pinned.checksums] == [[11, 22]]


def test_a_reported_corrupt_chunk_is_dropped_and_counted(verifying: Harness) -> None:
    h = verifying
    h.hello(b"w1", NS_A)
    h.hello(b"loader", role="worker")
    r = h.ok(b"w1", P.Reserve(1, NS_A, hashes(1, 2, 3)))
    h.ok(b"w1", P.Commit(2, r.lease_id, hashes(1, 2, 3), P.pack_u64([11, 22, 33])))  # type: ignore[union-attr]
    pinned = h.lookup(b"loader", [NS_A], hashes(1, 2, 3), pin=True)

    stale = h.ok(b"loader", P.Corrupt(3, NS_A, hashes(2), P.pack_u64([99])))
    assert isinstance(stale, P.CorruptReply) and stale.dropped == 0, "another checksum: a stale report"
    bad = h.ok(b"loader", P.Corrupt(4, NS_A, hashes(2), P.pack_u64([22])))
    assert isinstance(bad, P.CorruptReply) and bad.dropped == 1
    assert h.lookup(b"w1", [NS_A], hashes(1, 2, 3)).hits == 1, "never served again: the prefix ends before it"
    s = h.stats()
    assert s["errors_by_code"] == {"CORRUPT": 1} and s["corrupt_chunks"] == 1
    assert s["tiers"]["host"]["entries"] == 2
    used = s["tiers"]["host"]["used_bytes"]
    h.ok(b"loader", P.Release(5, pinned.lease_id))
    assert h.stats()["tiers"]["host"]["used_bytes"] < used, "the pinned slot is freed with the last pin"
    again = h.ok(b"w1", P.Reserve(6, NS_A, hashes(1, 2, 3)))
    assert list(again.status) == [P.SlotStatus.PRESENT, P.SlotStatus.WRITE, P.SlotStatus.PRESENT]  # type: ignore


def test_a_corrupt_report_about_intact_bytes_drops_nothing(verifying: Harness) -> None:
    """The sidecar hashes a reported slot itself: a client cannot drop others' chunks by
    reporting them with the checksum a pinned LOOKUP gave it."""
    from lmkv_mp.wire.checksum import checksum

    h = verifying
    h.hello(b"w1", NS_A)
    h.hello(b"liar", role="worker")
    intact = checksum(bytes(CHUNK))            # a fresh pool's slots hold zeros
    r = h.ok(b"w1", P.Reserve(1, NS_A, hashes(1)))
    h.ok(b"w1", P.Commit(2, r.lease_id, hashes(1), P.pack_u64([intact])))  # type: ignore[union-attr]
    lie = h.ok(b"liar", P.Corrupt(3, NS_A, hashes(1), P.pack_u64([intact])))
    assert isinstance(lie, P.CorruptReply) and lie.dropped == 0
    assert h.lookup(b"w1", [NS_A], hashes(1)).hits == 1 and h.stats()["errors_by_code"] == {}
    h.error(b"liar", P.Corrupt(4, NS_A, hashes(*range(1, 66)), P.pack_u64([intact] * 65)), P.ErrorCode.TOO_LARGE)


def test_corrupt_reports_are_refused_without_verify(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.store(b"w1", NS_A, hashes(1))              # verify off: its checksum is 0
    err = sc.error(b"w1", P.Corrupt(1, NS_A, hashes(1), P.pack_u64([0])), P.ErrorCode.BAD_REQUEST)
    assert "--verify off" in err.message
    assert sc.lookup(b"w1", [NS_A], hashes(1)).hits == 1


def test_restart_with_verify_drops_chunks_stored_without_checksums(sc: Harness) -> None:
    sc.hello(b"w1", NS_A)
    sc.store(b"w1", NS_A, hashes(1, 2))            # verify off: no checksums
    sc.server.close()
    sc.flags = (*sc.flags, "--verify", "on")
    sc.server = sc._new()
    s = sc.stats()
    assert s["tiers"]["host"]["entries"] == 0 and s["tiers"]["host"]["used_bytes"] == 0


def test_lookup_without_verify_carries_no_checksums(sc: Harness) -> None:
    assert not sc.hello(b"w1", NS_A).verify
    sc.store(b"w1", NS_A, hashes(1))
    assert sc.lookup(b"w1", [NS_A], hashes(1), pin=True).checksums == []


# -- per-client limits ---------------------------------------------------------------------------


def test_one_writer_cannot_hold_more_than_its_share_of_the_pool(tmp_path: Path) -> None:
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), "--client-pool-share", "25%")
    try:
        h.hello(b"w1", NS_A, chunk=1 << 20)
        h.hello(b"w2", NS_A, chunk=1 << 20)
        cap = h.stats()["tiers"]["host"]["capacity_bytes"]
        share = cap // 4 // (1 << 20)
        r1 = h.ok(b"w1", P.Reserve(1, NS_A, hashes(*range(1, 2 * share))))
        assert isinstance(r1, P.ReserveReply)
        assert list(r1.status) == [P.SlotStatus.WRITE] * share + [P.SlotStatus.NO_SPACE] * (share - 1)
        r1b = h.ok(b"w1", P.Reserve(2, NS_A, hashes(500)))
        assert list(r1b.status) == [P.SlotStatus.NO_SPACE], "a second lease counts against the same share"  # type: ignore
        r2 = h.ok(b"w2", P.Reserve(3, NS_A, hashes(1000, 1001)))
        assert list(r2.status) == [P.SlotStatus.WRITE] * 2, "other writers still find room"  # type: ignore
        assert h.stats()["quota_refused_chunks"] == share
        h.ok(b"w1", P.Commit(4, r1.lease_id))
        r1c = h.ok(b"w1", P.Reserve(5, NS_A, hashes(600)))
        assert list(r1c.status) == [P.SlotStatus.WRITE], "committed chunks no longer count"  # type: ignore
    finally:
        h.close()


def test_one_reader_cannot_pin_more_than_its_share_of_the_pool(tmp_path: Path) -> None:
    h = Harness(Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), "--client-pool-share", "25%")
    try:
        h.hello(b"w1", NS_A, chunk=1 << 20)
        h.hello(b"r1", role="scheduler")
        share = h.stats()["tiers"]["host"]["capacity_bytes"] // 4 // (1 << 20)
        h.store(b"w1", NS_A, hashes(*range(1, share + 1)))   # committed chunks leave the write share
        h.store(b"w1", NS_A, hashes(share + 1, share + 2))
        p = h.lookup(b"r1", [NS_A], hashes(*range(1, share + 3)), pin=True)
        assert p.hits == share and h.stats()["quota_refused_chunks"] == 2
        assert h.lookup(b"r1", [NS_A], hashes(*range(1, share + 1)), pin=True).hits == share, "the same chunks again"
        assert h.lookup(b"r1", [NS_A], hashes(*range(1, share + 3))).hits == share + 2, "unpinned: no limit"
        assert h.lookup(b"w1", [NS_A], hashes(*range(1, share + 3)), pin=True).hits == share, "per client"
    finally:
        h.close()


def test_a_full_namespace_table_forgets_the_namespaces_nothing_uses(sc: Harness,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_NAMESPACES, a HELLO that brings a new namespace makes the sidecar forget
    those that no connected client declares and no entry uses (models no longer served);
    one whose chunks are cached stays, and its chunks still hit; one a live client declared
    stays; with every namespace in use the HELLO is refused, as before."""
    import lmkv_mp.sidecar.handlers as handlers

    monkeypatch.setattr(handlers, "MAX_NAMESPACES", 3)
    ns = [bytes([i]) * 16 for i in range(1, 6)]
    sc.hello(b"w1", ns[0])
    sc.store(b"w1", ns[0], hashes(1, 2))
    sc.hello(b"w2", ns[1])
    sc.hello(b"w3", ns[2])
    sc.server.clients[b"w2"].last_seen = time.monotonic() + 10  # w2 stays; w1 and w3 go silent
    sc.server.reap(time.monotonic() + 5)
    sc.hello(b"w4", ns[3])
    index = sc.server.index
    assert index.chunk_bytes(ns[2]) is None and ns[2] not in sc.server.ns_names
    assert index.chunk_bytes(ns[0]) == CHUNK and index.chunk_bytes(ns[1]) == CHUNK and index.namespace_count() == 3
    assert sc.lookup(b"w4", [ns[0]], hashes(1, 2)).hits == 2
    sc.error(b"w5", P.Hello(5, P.PROTOCOL_VERSION, "worker", 1, "", [P.NamespaceInfo(ns[4], CHUNK)]),
             P.ErrorCode.QUOTA)
    sc.server.clients[b"w2"].last_seen = time.monotonic() + 10
    sc.server.reap(time.monotonic() + 5)  # w4 goes: its namespace is free to forget
    sc.hello(b"w2", ns[2], chunk=2 * CHUNK)  # a forgotten one is declared anew, any chunk size
    assert index.chunk_bytes(ns[2]) == 2 * CHUNK and index.chunk_bytes(ns[3]) is None


def test_namespaces_and_clients_are_bounded(sc: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmkv_mp.sidecar.handlers as handlers

    monkeypatch.setattr(handlers, "MAX_NAMESPACES_PER_CLIENT", 3)
    monkeypatch.setattr(handlers, "MAX_NAMESPACES", 5)
    monkeypatch.setattr(handlers, "MAX_CLIENTS", 3)
    ns = [bytes([i]) * 16 for i in range(1, 8)]
    sc.hello(b"c1", *ns[:3])
    sc.hello(b"c1", *ns[:3])  # the same ones again: nothing new
    sc.error(b"c1", P.Hello(2, P.PROTOCOL_VERSION, "worker", 1, "", [P.NamespaceInfo(ns[3], CHUNK)]),
             P.ErrorCode.QUOTA)
    sc.hello(b"c2", *ns[3:5])
    sc.error(b"c3", P.Hello(3, P.PROTOCOL_VERSION, "worker", 1, "", [P.NamespaceInfo(ns[5], CHUNK)]),
             P.ErrorCode.QUOTA)
    sc.hello(b"c3", ns[0])
    sc.error(b"c4", P.Hello(4, P.PROTOCOL_VERSION, "worker"), P.ErrorCode.QUOTA)
    sc.server.reap(time.monotonic() + 5)
    sc.hello(b"c4")  # idle clients reaped: room again


def test_reply_mark_is_twice_the_request_mark(tmp_path: Path) -> None:
    """A ROUTER drops replies at its SNDHWM, judged on credits that lag by half a mark:
    twice ``--client-max-inflight`` keeps every reply of a client within that limit
    (tests/faults/test_frames.py's live fuzz pipelines up to it)."""
    import zmq

    from lmkv_mp.sidecar.access import OWNER_ONLY
    from lmkv_mp.sidecar.startup import bind

    ctx = zmq.Context()
    sock = bind(ctx, zmq.ROUTER, f"ipc://{tmp_path}/c.sock", 48, OWNER_ONLY)
    try:
        assert sock.getsockopt(zmq.RCVHWM) == 48 and sock.getsockopt(zmq.SNDHWM) == 96
    finally:
        sock.close(linger=0)
        ctx.term()
