"""RedisTier: the ``remote`` tier, a Redis or Valkey server or cluster shared by many nodes.

One value per record under ``<key_prefix><key hex>``: the same 64-byte record header as a
disk record, then the payload. Readers verify key, length and checksum; a bad value is a
miss, is deleted and counted as ``corrupt``. Sidecars on different nodes that share a store
(and a hash key) share chunks.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` and ``redis+cluster://`` (Redis /
Valkey Cluster: any node's address; the scheme is rewritten to ``redis://`` for redis-py's
``RedisCluster``). Valkey speaks RESP and works the same.

Failure contract: every call has ``timeout_s`` as its connect timeout and as the timeout
of each socket read and write, and redis-py never retries. A call that fails to reach the
store (refused, timed out, reset) marks the tier **down** for a back-off (0.5 s, doubling up
to 10 s) during which every call returns a miss at once without touching the network; the
first call after the back-off probes the store (the others keep answering misses until it
succeeds). A dead or stopped Redis therefore costs a thread at most about one connect or
read timeout, never more, and the tier recovers by itself when the store returns. Errors
the server answers (out of memory, wrong type) fail that call only.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from lmkv_mp.sidecar.tiers.base import (HEADER_BYTES, KEY_BYTES, CorruptRecord, TierCounters, TierUsage, pack_header,
                                        parse_header)
from lmkv_mp.wire.checksum import checksum

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
_UNREACHABLE = (RedisError, RedisClusterException, OSError)
_T = TypeVar("_T")


class _Fail(enum.Enum):
    DOWN = "down"                # in back-off: the network was not touched
    UNREACHABLE = "unreachable"  # connect/read/write failed or timed out: now down
    REFUSED = "refused"          # the store answered with an error (OOM, wrong type)


class _Availability:
    """Up, or down until a deadline; after it, exactly one caller at a time probes."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._lock = threading.Lock()
        self._initial, self._max = initial_s, max_s
        self._delay = initial_s
        self._down_until: float | None = None   # None: up
        self._probing = False

    @property
    def down(self) -> bool:
        return self._down_until is not None

    def allow(self) -> bool:
        """Whether a call may touch the network now."""
        with self._lock:
            if self._down_until is None:
                return True
            if self._probing or time.monotonic() < self._down_until:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        if self._down_until is not None:
            with self._lock:
                self._down_until, self._probing, self._delay = None, False, self._initial

    def failed(self) -> None:
        with self._lock:
            if self._down_until is not None and not self._probing:
                return      # another thread marked it down already
            self._down_until = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self._max)
            self._probing = False


class RedisTier:
    """The ``remote`` tier over redis-py; see the module docstring for the contracts.

    ``usage()`` never does I/O (the stats snapshot calls it on the control loop): it reports
    what this sidecar wrote (puts, minus the values it deleted), with capacity 0. What the
    store holds in all is not knowable from one node: other nodes write to it, and the
    store evicts under its own ``maxmemory`` policy.
    """

    name = "remote"
    local_index = False

    def __init__(self, url: str, timeout_s: float = 0.5, key_prefix: str = "lmkv:v1:",
                 backoff_initial_s: float = BACKOFF_INITIAL_S, backoff_max_s: float = BACKOFF_MAX_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"remote tier timeout {timeout_s}s must be above 0 (--remote-timeout)")
        self.url = url
        self.timeout_s = timeout_s
        self.cluster = url.startswith("redis+cluster://")
        self.counters = TierCounters()
        self.availability = _Availability(backoff_initial_s, backoff_max_s)
        self._prefix = key_prefix.encode()
        self._client_lock = threading.Lock()
        self._client: Any = None        # redis.Redis | RedisCluster, made on first use
        self._usage_lock = threading.Lock()
        self._entries = 0
        self._used = 0
        if not self.cluster:
            self._connect()             # lazy: connects on the first command, not here

    def _connect(self) -> Any:
        """The client; a cluster client is made on first use (it reads the slot map when
        made, which needs the network and may fail: the caller treats that as down)."""
        with self._client_lock:
            if self._client is None:
                timeouts: dict[str, Any] = {"socket_timeout": self.timeout_s,
                                            "socket_connect_timeout": self.timeout_s}
                if self.cluster:
                    self._client = RedisCluster.from_url("redis://" + self.url[len("redis+cluster://"):],
                                                         retry=Retry(NoBackoff(), 0), **timeouts)
                else:
                    self._client = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **timeouts)
            return self._client

    def _rkey(self, key: bytes) -> bytes:
        if len(key) != KEY_BYTES:
            raise ValueError(f"tier keys are {KEY_BYTES} bytes (namespace id + chain hash), got {len(key)}")
        return self._prefix + key.hex().encode()

    def _call(self, op: Callable[[Any], _T]) -> _T | _Fail:
        """``op(client)`` behind the availability gate: its result, or why there is none.
        Marks the tier up when the store answered (even with an error reply), down when it
        could not be reached, and down too when ``op`` raised anything else (a bug must not
        leave a probe claimed forever; the exception goes on to the caller)."""
        if not self.availability.allow():
            return _Fail.DOWN
        reached = False
        try:
            result = op(self._connect())
            reached = True
            return result
        except ResponseError:
            reached = True
            self.counters.add(errors=1)
            return _Fail.REFUSED
        except _UNREACHABLE:
            self.counters.add(errors=1)
            return _Fail.UNREACHABLE
        finally:
            if reached:
                self.availability.succeeded()
            else:
                self.availability.failed()

    def put(self, key: bytes, data: memoryview | bytes | bytearray) -> bool:
        """SET the record of ``data`` under ``key``. False when the tier is down, the store
        is unreachable (now down) or the store refused the value (e.g. out of memory)."""
        rkey = self._rkey(key)
        view = memoryview(data)
        view = view if view.format == "B" and view.ndim == 1 else view.cast("B")

        def op(client: Any) -> None:   # runs only when the tier is up: no checksum while down
            head = pack_header(key, view.nbytes, checksum(view))
            if self.cluster:
                # The cluster client routes by slot and follows MOVED/ASK itself; one copy
                # of the value is cheaper than re-implementing that here.
                value = bytearray(HEADER_BYTES + view.nbytes)
                value[:HEADER_BYTES] = head
                memoryview(value)[HEADER_BYTES:] = view
                client.set(rkey, value)
            else:
                _set_scattered(client, rkey, head, view)

        if isinstance(self._call(op), _Fail):
            return False
        self.counters.add(puts=1, put_bytes=view.nbytes)
        with self._usage_lock:
            self._entries += 1
            self._used += HEADER_BYTES + view.nbytes
        return True

    def get_into(self, key: bytes, dest: memoryview) -> bool:
        """GET the value of ``key``, verify it, copy its payload into ``dest``. True only when
        it names ``key`` and ``len(dest)`` bytes and its checksum matches; a bad value is
        deleted and counted as ``corrupt``; ``dest`` is untouched after a False."""
        rkey = self._rkey(key)
        dest = dest if dest.format == "B" and dest.ndim == 1 else dest.cast("B")
        value = self._call(lambda client: client.get(rkey))
        if value is None or value is _Fail.DOWN:
            self.counters.add(misses=1)
            return False
        if isinstance(value, _Fail):
            return False
        mv = memoryview(value)
        try:
            _, _, digest = parse_header(mv[:HEADER_BYTES], key, dest.nbytes)
            if mv.nbytes != HEADER_BYTES + dest.nbytes:
                raise CorruptRecord("value of the wrong size")
            if checksum(mv[HEADER_BYTES:]) != digest:
                raise CorruptRecord("payload checksum mismatch")
        except CorruptRecord:
            self._delete(rkey, mv.nbytes)
            self.counters.add(corrupt=1)
            return False
        dest[:] = mv[HEADER_BYTES:]
        self.counters.add(gets=1, get_bytes=dest.nbytes)
        return True

    def contains(self, key: bytes) -> bool:
        """EXISTS: one round trip (call from mover threads only). False while down."""
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[bytes]) -> list[bool]:
        """One pipelined EXISTS per key, one round trip per node. All False while down."""
        rkeys = [self._rkey(k) for k in keys]
        if not rkeys:
            return []

        def op(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for rk in rkeys:
                pipe.exists(rk)
            return pipe.execute()

        found = self._call(op)
        return [False] * len(rkeys) if isinstance(found, _Fail) else [bool(n) for n in found]

    def delete(self, key: bytes) -> None:
        """DEL (best effort: nothing happens while the tier is down)."""
        self._delete(self._rkey(key), None)

    def _delete(self, rkey: bytes, size: int | None) -> None:
        def op(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            if size is None:
                pipe.strlen(rkey)
            pipe.delete(rkey)
            return pipe.execute()

        found = self._call(op)
        if not isinstance(found, _Fail) and found[-1]:
            with self._usage_lock:
                self._entries = max(0, self._entries - 1)
                self._used = max(0, self._used - (found[0] if size is None else size))

    def usage(self) -> TierUsage:
        """What this sidecar wrote, minus what it deleted; capacity 0 (see the class doc)."""
        with self._usage_lock:
            return TierUsage(self._used, 0, self._entries)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _set_scattered(client: redis.Redis, rkey: bytes, header: bytes, payload: memoryview) -> None:
    """SET ``rkey`` to ``header + payload`` without building that value in memory: the
    command goes out as [command and header, payload, CRLF] on one pooled connection.

    It costs what a plain SET of the payload costs: joining header and payload first would
    copy the payload into a fresh buffer (and fault its pages in), and MULTI + SET header +
    APPEND payload makes Redis copy the payload again (bench/tiers.py compares them). Same
    wire bytes, no copy.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (
            len(rkey), rkey, len(header) + payload.nbytes, header), payload, b"\r\n"])
        client.parse_response(conn, "SET")
    except ResponseError:
        raise               # the reply was read whole: the connection is fine
    except BaseException:
        conn.disconnect()   # a half-sent command or an unread reply must never meet the next caller
        raise
    finally:
        pool.release(conn)
