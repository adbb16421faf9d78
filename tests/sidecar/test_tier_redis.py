"""RedisTier (lmkv_mp/sidecar/tiers/redis.py) against a real redis-server: sharing, corruption,
a dead or stopped store (bounded misses, back-off, recovery) and Redis Cluster."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from lmkv_mp.sidecar.tiers.base import HEADER_BYTES, pack_header
from lmkv_mp.wire.checksum import checksum
from lmkv_mp.sidecar.tiers.redis import RedisTier, _Availability

from tests.conftest import wait_for
from tests.helpers.redisproc import RedisServer, free_port, redis_cluster, require_redis_cli
from tests.helpers import tierdata
from tests.helpers.tierdata import read, value

NS = b"\x22" * 16
TIMEOUT = 0.3
BACKOFF = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}   # test-fast recovery
SLACK = 1.0     # a loaded 2-core box stretches every bound; a hung call would take far longer


def key(i: int) -> bytes:
    return tierdata.key(NS, i)


@pytest.fixture
def tiers(redis_server: RedisServer) -> Iterator[list[RedisTier]]:
    """Tiers made by the test (closed at teardown)."""
    made: list[RedisTier] = []
    yield made
    for t in made:
        t.close()


def tier(made: list[RedisTier], url: str, **kw: float) -> RedisTier:
    made.append(RedisTier(url, **{"timeout_s": TIMEOUT, **BACKOFF, **kw}))
    return made[-1]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_put_get_byte_identical_and_shared_by_two_nodes(redis_server: RedisServer, tiers: list[RedisTier],
                                                        transport: str) -> None:
    url = redis_server.url if transport == "tcp" else redis_server.unix_url
    node1, node2 = tier(tiers, url), tier(tiers, url)
    sizes = [0, 1, 4095, 65537, (1 << 20) + 3]
    for n in sizes:
        data = os.urandom(n)
        assert node1.put(key(n), memoryview(data))
        assert read(node2, key(n), n) == data, "another node reads what this one wrote"
    assert node2.contains_many([key(n) for n in sizes] + [key(7)]) == [True] * len(sizes) + [False]
    assert node2.contains(key(sizes[0])) and not node2.contains(key(7))
    assert read(node2, key(7), 10) is None and node2.counters.misses == 1
    assert node1.usage().entries == len(sizes) and node1.usage().capacity_bytes == 0
    assert node1.usage().used_bytes == sum(HEADER_BYTES + n for n in sizes)
    node1.delete(key(1))
    assert not node2.contains(key(1)) and node1.usage().entries == len(sizes) - 1
    c = node2.counters.as_dict()
    assert (c["gets"], c["get_bytes"], c["corrupt"], c["errors"]) == (len(sizes), sum(sizes), 0, 0)


def test_values_carry_the_record_header(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier(tiers, redis_server.url, key_prefix="app:")
    assert t.put(key(1), memoryview(b"abc"))
    raw = redis.Redis.from_url(redis_server.url).get(b"app:" + key(1).hex().encode())
    assert raw is not None and raw[:HEADER_BYTES] == pack_header(key(1), 3, checksum(b"abc")) and raw[64:] == b"abc"


def spoil(kind: str, raw: redis.Redis, rkey: bytes, other: bytes) -> None:
    if kind == "garbage":
        raw.set(rkey, b"not a record at all")
    elif kind == "flip":
        v = bytearray(raw.get(rkey) or b"")
        v[HEADER_BYTES + 500] ^= 0x10
        raw.set(rkey, bytes(v))
    elif kind == "other-key":       # a whole, valid record of another key under this name
        raw.set(rkey, raw.get(other) or b"")
    elif kind == "truncate":
        raw.set(rkey, (raw.get(rkey) or b"")[:-1])


@pytest.mark.parametrize("kind", ["garbage", "flip", "other-key", "truncate"])
def test_corrupt_value_is_a_miss_deleted_and_counted(redis_server: RedisServer, tiers: list[RedisTier],
                                                     kind: str) -> None:
    n = 1000
    t = tier(tiers, redis_server.url)
    t.put(key(1), memoryview(value(1, n)))
    t.put(key(2), memoryview(value(2, n)))
    raw = redis.Redis.from_url(redis_server.url)
    rkey = b"lmkv:v1:" + key(1).hex().encode()
    spoil(kind, raw, rkey, b"lmkv:v1:" + key(2).hex().encode())
    dest = bytearray(b"\x55" * n)
    assert not t.get_into(key(1), memoryview(dest))
    assert dest == b"\x55" * n, "a bad value never reaches the slot"
    assert t.counters.corrupt == 1 and not raw.exists(rkey)
    assert read(t, key(2), n) == value(2, n)


def test_wrong_length_request_is_a_miss(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier(tiers, redis_server.url)
    t.put(key(1), memoryview(value(1, 1000)))
    assert read(t, key(1), 999) is None and t.counters.corrupt == 1 and not t.contains(key(1))


def test_dead_redis_means_fast_misses_then_recovery(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier(tiers, redis_server.url)
    assert t.put(key(1), memoryview(value(1, 4096)))
    redis_server.kill()
    t0 = time.monotonic()
    assert not t.put(key(2), memoryview(value(2, 4096)))
    assert time.monotonic() - t0 < TIMEOUT + SLACK
    assert t.availability.down and t.counters.errors == 1
    t0 = time.monotonic()   # in back-off: answered at once, without the network
    assert read(t, key(1), 4096) is None and t.contains_many([key(1), key(2)]) == [False, False]
    assert not t.put(key(3), memoryview(b"x")) and not t.contains(key(1))
    t.delete(key(1))
    assert time.monotonic() - t0 < 0.05 and t.counters.errors == 1
    redis_server.start()    # same port, empty (no persistence)
    wait_for(lambda: t.put(key(4), memoryview(value(4, 4096))), 10, "the tier to recover")
    assert not t.availability.down and read(t, key(4), 4096) == value(4, 4096)


def test_stopped_redis_costs_one_timeout_not_a_hang(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    """A store that accepts connections but never answers (SIGSTOP): each call gives up
    after about the timeout (connect, then one read or write), never hangs."""
    first = tier(tiers, redis_server.url)
    assert first.put(key(1), memoryview(value(1, 4096)))
    calls = {"get": lambda t: read(t, key(1), 4096), "put": lambda t: t.put(key(2), memoryview(value(2, 4 << 20))),
             "contains_many": lambda t: t.contains_many([key(1)])[0]}
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for name, call in calls.items():
            fresh = tier(tiers, redis_server.url)     # up: this call goes to the network
            t0 = time.monotonic()
            assert not call(fresh), name
            assert time.monotonic() - t0 < 2 * TIMEOUT + SLACK, name
            assert fresh.availability.down and fresh.counters.errors == 1, name
        t0 = time.monotonic()
        assert not call(first) and time.monotonic() - t0 < 2 * TIMEOUT + SLACK   # a pooled connection
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: read(first, key(1), 4096) == value(1, 4096), 10, "the tier to recover")


def test_unreachable_cluster_is_down_not_an_exception() -> None:
    t = RedisTier(f"redis+cluster://127.0.0.1:{_closed_port()}", timeout_s=TIMEOUT, **BACKOFF)
    t0 = time.monotonic()
    assert not t.put(key(1), memoryview(b"x")) and t.contains_many([key(1)]) == [False]
    assert time.monotonic() - t0 < TIMEOUT + SLACK and t.availability.down
    t.close()


def _closed_port() -> int:
    return free_port()


def test_back_off_doubles_allows_one_probe_and_resets() -> None:
    a = _Availability(0.05, 0.1)
    assert a.allow()
    a.failed()
    assert a.down and not a.allow()
    wait_for(a.allow, 2, "the first back-off to end")
    assert not a.allow(), "one probe at a time"
    a.failed()
    t0 = time.monotonic()
    wait_for(a.allow, 2, "the second back-off to end")
    assert time.monotonic() - t0 >= 0.09, "the back-off doubled"
    a.succeeded()
    assert not a.down and a.allow() and a.allow()


def test_concurrent_put_get_from_threads(redis_server: RedisServer, tiers: list[RedisTier]) -> None:
    n, keys, rounds = 64 << 10, 5, 40
    t = tier(tiers, redis_server.url, timeout_s=5.0)
    errors: list[str] = []

    def write(w: int) -> None:
        for r in range(rounds):
            i = (r + w) % keys
            if not t.put(key(i), memoryview(value(i, n, version=w * rounds + r))):
                errors.append(f"put {i} failed")

    def check(w: int) -> None:
        buf = bytearray(n)
        for r in range(rounds):
            i = (r * 3 + w) % keys
            if t.get_into(key(i), memoryview(buf)) and bytes(buf) != value(i, n, int.from_bytes(buf[4:8], "little")):
                errors.append(f"key {i}: not one whole version")

    threads = [threading.Thread(target=f, args=(w,)) for f in (write, check) for w in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]
    assert t.counters.corrupt == 0 and t.counters.errors == 0


def test_redis_cluster_round_trips() -> None:
    require_redis_cli()
    with redis_cluster(3) as nodes:
        t = RedisTier(f"redis+cluster://127.0.0.1:{nodes[0].port}", timeout_s=2.0)
        other = RedisTier(f"redis+cluster://127.0.0.1:{nodes[2].port}", timeout_s=2.0)
        try:
            ks = [key(i) for i in range(24)]           # spread over the three nodes' slots
            for i, k in enumerate(ks):
                assert t.put(k, memoryview(value(i, 3000 + i)))
            assert other.contains_many(ks + [key(99)]) == [True] * len(ks) + [False]
            assert all(read(other, k, 3000 + i) == value(i, 3000 + i) for i, k in enumerate(ks))
            other.delete(ks[0])
            assert not t.contains(ks[0])
            assert read(other, ks[1], 10) is None and other.counters.corrupt == 1   # wrong length
            assert not t.contains(ks[1])
        finally:
            t.close()
            other.close()
