"""Clients that die or freeze: a writer SIGKILLed mid-copy, a reader SIGKILLed while it
holds pins, a client SIGSTOPped past the lease timeout and then continued.

The promises (ARCHITECTURE §7): a dead or silent client loses its leases within the lease
timeout, its slots come back, nothing it half-wrote is ever visible, what others stored
is untouched; a client that comes back gets clean errors for its stale leases and works
again after a new HELLO, without anyone restarting it.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Callable

import pytest
import torch

from lmkv_mp.wire import protocol as P

from tests.conftest import LEASE_TIMEOUT, Procs, SidecarHandle, stats, wait_for
from tests.faults.common import A_IDS, B_IDS, N, SEED, assert_no_leaks, load_and_check, ns_info, spec
from tests.helpers import kvproc as K

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["reserve-and-hang", "copy-until-killed"])
def test_writer_killed_mid_copy(mode: str, sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h = sidecar()
    ns = ns_info()
    other = h.client(role="worker", namespaces=[ns])
    assert other.connect()
    hashes = K.prompt_hashes(5, N, other.hello.hash_key)  # type: ignore[union-attr]
    baseline = stats(h)["tiers"]["host"]["used_bytes"]

    writer = procs.kvproc(mode, spec(h, 5))
    line = procs.read_line(writer)
    assert line.startswith("RESERVED"), line
    s = stats(h)
    assert s["leases"]["write"] == 1 and s["tiers"]["host"]["entries_by_state"]["writing"] == N
    assert s["tiers"]["host"]["used_bytes"] > baseline
    assert other.lookup([ns.id], hashes).hits == 0, "WRITING chunks are invisible"
    busy = other.reserve(ns.id, hashes)
    assert busy is not None and busy.lease_id == 0 and set(busy.status) == {P.SlotStatus.BUSY}

    writer.kill()  # copy-until-killed: in the middle of a gather
    writer.wait()
    t0 = time.monotonic()
    assert other.lookup([ns.id], hashes).hits == 0
    wait_for(lambda: (s := stats(h))["leases"]["write"] == 0 and s["tiers"]["host"]["used_bytes"] == baseline,
             LEASE_TIMEOUT + 3.0, "the dead writer's lease to expire and its slots to return")
    assert time.monotonic() - t0 <= LEASE_TIMEOUT + 3.0
    s = stats(h)
    assert s["tiers"]["host"]["entries"] == 0 and s["aborted_writes"] == N
    assert s["clients"] == {"worker": 1}, "the dead writer was reaped, the live client kept"
    assert other.lookup([ns.id], hashes).hits == 0

    stored = procs.result(procs.kvproc("store", spec(h, 5)))
    assert stored["written"] == N and stored["committed"] == N
    loaded = procs.result(procs.kvproc("load", spec(h, 5, seed=None, block_ids=B_IDS,
                                                     out=str(procs.log_dir / "loaded.pt"))))
    assert loaded["loaded"] == N and loaded["released"]
    got = torch.load(procs.log_dir / "loaded.pt")
    want = K.block_bytes(K.make_cache(K.rank_seed(SEED, 0)), A_IDS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert_no_leaks(h, ns.chunk_bytes)


def test_reader_killed_while_holding_pins(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    """A reader dies between its pinned LOOKUP and its RELEASE: the pins end with its lease,
    the chunks stay (a dead reader loses nobody's data) and can be evicted again."""
    h = sidecar("--host-pool-size", "8MiB", "--slab-size", "1MiB")   # 4 slabs of 16 chunks
    ns = ns_info()
    me = h.client(role="worker", namespaces=[ns])
    assert me.connect()
    key = me.hello.hash_key  # type: ignore[union-attr]
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    reader = procs.kvproc("pin-and-hang", spec(h, 1))
    line = procs.read_line(reader)
    assert line.startswith("PINNED") and json.loads(line.split(" ", 1)[1])["hits"] == N, line
    assert stats(h)["leases"]["read"] == 1

    # While pinned, no amount of writing evicts them: write the pool over once and a half.
    rounds = stats(h)["tiers"]["host"]["capacity_bytes"] // ns.chunk_bytes * 3 // 2 // N
    for seed in range(100, 100 + rounds):
        me_hashes = K.prompt_hashes(seed, N, key)
        r = me.reserve(ns.id, me_hashes)
        assert r is not None
        assert me.commit(r.lease_id) == N
    assert stats(h)["evictions"] > 0, "the pool was under pressure"
    assert load_and_check(me, ns, K.prompt_hashes(1, N, key)) == N

    reader.kill()
    reader.wait()
    wait_for(lambda: stats(h)["leases"]["read"] == 0, LEASE_TIMEOUT + 3.0, "the dead reader's pins to end")
    assert load_and_check(me, ns, K.prompt_hashes(1, N, key)) == N, "its chunks are still there, intact"
    assert_no_leaks(h, ns.chunk_bytes)
    # Unpinned, they are ordinary LRU entries again: enough new writes evict them.
    for seed in range(200, 200 + rounds):
        r = me.reserve(ns.id, K.prompt_hashes(seed, N, key))
        assert r is not None and me.commit(r.lease_id) == N
    assert me.lookup([ns.id], K.prompt_hashes(1, N, key)).hits == 0
    assert_no_leaks(h, ns.chunk_bytes)


def test_client_stopped_past_the_lease_timeout(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    """SIGSTOP a client holding a read and a write lease for longer than the lease timeout,
    then SIGCONT it: its leases are gone (the written chunks never appear, the pinned ones
    are evictable), its stale COMMIT and RELEASE fail cleanly and fast, and it works again
    under a new client id (it re-HELLOed by itself)."""
    h = sidecar()
    ns = ns_info()
    me = h.client(role="worker", namespaces=[ns])
    assert me.connect()
    key = me.hello.hash_key  # type: ignore[union-attr]
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    sleeper = procs.kvproc("hold-then-resume", spec(h, 1, other_prompt_seed=2, load_block_ids=B_IDS))
    line = procs.read_line(sleeper)
    assert line.startswith("HELD"), line
    held = json.loads(line.split(" ", 1)[1])
    assert held["hits"] == N and held["reserved"] == N
    assert stats(h)["leases"] == {"read": 1, "write": 1}

    sleeper.send_signal(signal.SIGSTOP)
    wait_for(lambda: (s := stats(h))["leases"] == {"read": 0, "write": 0} and s["clients"] == {"worker": 1},
             LEASE_TIMEOUT + 3.0, "the stopped client to be reaped")
    assert me.lookup([ns.id], K.prompt_hashes(2, N, key)).hits == 0, "its half-written chunks never appear"
    s = stats(h)
    assert s["aborted_writes"] == N and s["tiers"]["host"]["entries_by_state"] == {"writing": 0, "committed": N}

    sleeper.send_signal(signal.SIGCONT)
    sleeper.send_signal(signal.SIGUSR1)
    out = procs.result(sleeper)
    assert out["stale_commit"] == 0 and out["stale_release"] is False, "clean failures, no exception"
    assert out["stale_calls_s"] < 2.0
    assert out["client_id_after"] != out["client_id_before"], "it registered again"
    assert out["stored"] == N and out["loaded"] == N and out["bytes_ok"] and out["released"]
    errors = stats(h)["errors_by_code"]
    assert set(errors) <= {"NOT_REGISTERED", "UNKNOWN_LEASE"} and errors, errors
    assert load_and_check(me, ns, K.prompt_hashes(1, N, key)) == N
    assert_no_leaks(h, ns.chunk_bytes)
