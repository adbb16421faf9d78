"""The host pool full: of committed chunks (eviction makes room, lookups and stores go
on, pinned chunks are never touched), and of pinned chunks and writes in flight (a store
gets NO_SPACE, an answer, not an error, and lookups still work)."""

from __future__ import annotations

from typing import Callable

import pytest

from lmkv_mp.wire import protocol as P

from tests.conftest import SidecarHandle, stats
from tests.faults.common import assert_no_leaks
from tests.sidecar.test_tiers import CHUNK_BYTES, NS, SMALL_HOST, chunk_hashes, load, payload, store

pytestmark = pytest.mark.slow


def test_a_full_pool_evicts_and_never_touches_pinned_chunks(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar(*SMALL_HOST)
    writer = h.client(namespaces=[NS])
    reader = h.client(role="scheduler")
    capacity = stats(h)["tiers"]["host"]["capacity_bytes"] // CHUNK_BYTES
    kept = chunk_hashes(4, seed=20)
    assert store(writer, kept) == 4
    pin = reader.lookup([NS.id], b"".join(kept), pin=True)
    assert pin.hits == 4

    stream = chunk_hashes(3 * capacity, seed=21)     # the pool over three times
    for i in range(0, len(stream), 2):
        assert store(writer, stream[i:i + 2]) == 2, "eviction always made room"
        recent = stream[max(0, i - 4):i + 2]
        assert writer.lookup([NS.id], b"".join(recent)).hits == len(recent), "recent chunks are found"
    s = stats(h)
    assert s["evictions"] >= 2 * capacity and s["tiers"]["host"]["entries"] <= capacity
    host = writer.host_tensor()
    assert host is not None
    for h_, off in zip(kept, pin.offsets[0].tolist()):
        assert bytes(host[off:off + CHUNK_BYTES].numpy()) == payload(h_), "a pinned chunk is never overwritten"
    assert reader.release(pin.lease_id)
    assert load(writer, kept) == [payload(x) for x in kept], "and it is still there"
    assert load(writer, stream[-4:]) == [payload(x) for x in stream[-4:]]
    assert_no_leaks(h, CHUNK_BYTES)


def test_a_pool_full_of_pins_answers_no_space_and_keeps_serving(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar(*SMALL_HOST, "--client-pool-share", "100%")
    writer = h.client(namespaces=[NS])
    reader = h.client(role="scheduler")
    capacity = stats(h)["tiers"]["host"]["capacity_bytes"] // CHUNK_BYTES
    held = chunk_hashes(capacity, seed=22)
    assert store(writer, held) == capacity
    pin = reader.lookup([NS.id], b"".join(held), pin=True)
    assert pin.hits == capacity

    more = chunk_hashes(3, seed=23)
    r = writer.reserve(NS.id, b"".join(more))
    assert r is not None and list(r.status) == [P.SlotStatus.NO_SPACE] * 3 and r.lease_id == 0
    assert writer.lookup([NS.id], b"".join(held)).hits == capacity, "lookups go on"
    assert stats(h)["errors"] == 0, "a full pool is an answer, not an error"

    assert reader.release(pin.lease_id)
    assert store(writer, more) == 3, "unpinned: eviction makes room again"
    assert load(writer, more) == [payload(x) for x in more]
    assert_no_leaks(h, CHUNK_BYTES)
