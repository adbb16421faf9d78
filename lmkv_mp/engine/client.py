"""SidecarClient: how schedulers and workers talk to the sidecar.

Contract with the engine: the data-path methods (:meth:`lookup`, :meth:`reserve`,
:meth:`commit`, :meth:`release`, :meth:`ping`) never raise and never wait longer than the
configured deadline. A sidecar that is down, slow or restarting turns into a miss
("0 hits", "not stored"). After a failure the client stops asking for ``retry_interval``
(calls return a miss at once) while its heartbeat thread probes; when the sidecar answers
again the client re-HELLOs on its own. Every reply carries the sidecar's ``boot_id``: a new
one means the sidecar restarted and every lease this client held is gone.

One DEALER socket per client, guarded by a lock (the heartbeat thread and the caller take
turns). A late reply to a request that already timed out is recognised by its request id
and dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import zmq

from lmkv_mp.wire import protocol as P
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.config import ClientConfig, load_client_config

if TYPE_CHECKING:
    # torch (via lmkv_mp.memory) is imported on first use of the host region: it costs
    # seconds, and schedulers' lookups and `lmkv-stats` never map memory.
    import torch

    from lmkv_mp.memory import HostRegion

log = logging.getLogger("lmkv.client")

CONNECT_GRACE = 0.2
"""Longest wait for a connection to the sidecar inside one call (seconds)."""


class SidecarError(Exception):
    """The sidecar answered with an error (``code`` is a :class:`~lmkv_mp.wire.protocol.ErrorCode`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{P.ErrorCode(code).name if code in P.ErrorCode._value2member_map_ else code}: {message}")
        self.code = code


class SidecarUnavailable(SidecarError):
    """No answer within the deadline, or no sidecar listening."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.code = 0


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``offsets[i]`` / ``checksums[i]``: the pinned hits' byte offsets in the host region for
    the i-th namespace asked about (empty unless pinned). ``gpu_regions[i]`` /
    ``gpu_offsets[i]``: where each hit has a GPU tier copy (region 0: none); empty when the
    sidecar has no GPU tier."""

    hits: int
    lease_id: int = 0
    offsets: tuple[np.ndarray, ...] = ()
    checksums: tuple[np.ndarray, ...] = ()
    boot_id: bytes = b""
    pending: int = 0
    gpu_regions: tuple[np.ndarray, ...] = ()
    gpu_offsets: tuple[np.ndarray, ...] = ()


MISS = LookupResult(0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Per requested chunk: a :class:`~lmkv_mp.wire.protocol.SlotStatus` and, for WRITE, its host
    offset; ``gpu_regions``/``gpu_offsets`` (empty, or one per chunk): the GPU tier slot the
    writer fills too (region 0: none)."""

    lease_id: int
    status: np.ndarray
    offsets: np.ndarray
    boot_id: bytes
    gpu_regions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    gpu_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<u8"))

    def writable(self) -> np.ndarray:
        """Indices of the chunks this writer must copy and commit."""
        return np.flatnonzero(self.status == P.SlotStatus.WRITE)


class SidecarClient:
    """A connection to the sidecar. Thread-safe; close it with :meth:`close`."""

    def __init__(self, config: ClientConfig | None = None, *, role: str = "client", name: str = "",
                 namespaces: Sequence[P.NamespaceInfo] = (), heartbeat: bool = True, device: bytes = b"") -> None:
        self.config = config or load_client_config()
        self.role = role
        self.device = device   # a CUDA worker's device uuid: the sidecar gives it GPU tier slots there
        self.name = name or f"{role}-{os.getpid()}"
        self.namespaces: list[P.NamespaceInfo] = list(namespaces)
        self.hello: P.HelloReply | None = None
        self.restarts = 0
        self._boot_id = b""
        self._registered = False
        self._down_until = 0.0
        self._last_ok = 0.0
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ctx = zmq.Context.instance()
        self._sock = self._new_socket()
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._region: HostRegion | None = None
        self._old_regions: list[HostRegion] = []
        self._region_warned = ""
        self._closed = threading.Event()
        self._hb_wake = threading.Event()  # set on close, and when a HELLO may change the period
        self._hb: threading.Thread | None = None
        if heartbeat:
            self._hb = threading.Thread(target=self._heartbeat, name="lmkv-heartbeat", daemon=True)
            self._hb.start()

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)          # no queueing towards a sidecar that is not there
        sock.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(15))  # stable across reconnects
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(self.config.endpoint)
        return sock

    # -- state ------------------------------------------------------------------------------

    @property
    def boot_id(self) -> bytes:
        return self._boot_id

    @property
    def available(self) -> bool:
        """True after a recent successful exchange; False while backing off."""
        return self._registered and time.monotonic() >= self._down_until

    def connect(self, timeout: float | None = None) -> bool:
        """HELLO now (waiting up to ``timeout``, default the call deadline). True on success."""
        with self._lock:
            try:
                self._hello(time.monotonic() + (timeout or self.config.timeout))
                return True
            except SidecarError as e:
                log.debug("connect failed: %s", e)
                return False

    def declare(self, namespaces: Sequence[P.NamespaceInfo]) -> bool:
        """Add namespaces this client will write; re-HELLOs to tell the sidecar."""
        with self._lock:
            known = {ns.id for ns in self.namespaces}
            self.namespaces.extend(ns for ns in namespaces if ns.id not in known)
            self._registered = False
        return self.connect()

    def set_device(self, device: bytes) -> bool:
        """Name this client's CUDA device (its uuid; ``b""``: none) to the sidecar, which
        gives GPU tier slots only on the device a client names. A client that has said
        HELLO says it again now; one that has not names it in its first. False when that
        HELLO failed (the client then re-HELLOs on its own once the sidecar answers)."""
        with self._lock:
            self.device = device
            if self.hello is None:
                return True
            self._registered = False
        return self.connect()

    # -- data path: never raise -----------------------------------------------------------

    def lookup(self, namespaces: Sequence[bytes], hashes: bytes, pin: bool = False) -> LookupResult:
        """Leading chunks committed in every namespace; with ``pin`` a read lease and offsets."""
        if not hashes:
            return MISS
        try:
            r = self.call(P.Lookup(0, list(namespaces), hashes, pin))
        except SidecarError as e:
            log.debug("lookup: miss (%s)", e)
            return MISS
        assert isinstance(r, P.LookupReply)
        gpu_regions = tuple(np.frombuffer(g, dtype=np.uint8) for g in r.gpu_regions)
        gpu_offsets = tuple(np.frombuffer(o, dtype=np.uint64) for o in r.gpu_offsets)
        if len(gpu_regions) != len(gpu_offsets) or any(len(g) != len(o) for g, o in zip(gpu_regions, gpu_offsets)):
            gpu_regions = gpu_offsets = ()  # malformed: the host copies serve
        return LookupResult(r.hits, r.lease_id, tuple(np.frombuffer(o, dtype=np.uint64) for o in r.offsets),
                            tuple(np.frombuffer(c, dtype=np.uint64) for c in r.checksums), r.boot_id, r.pending,
                            gpu_regions, gpu_offsets)

    def reserve(self, namespace: bytes, hashes: bytes) -> Reservation | None:
        """Write slots for chunks not yet stored, or None (not stored) on any failure."""
        try:
            r = self.call(P.Reserve(0, namespace, hashes))
        except SidecarError as e:
            log.debug("reserve: not stored (%s)", e)
            return None
        assert isinstance(r, P.ReserveReply)
        status = np.frombuffer(r.status, dtype=np.uint8)
        offsets = np.frombuffer(r.offsets, dtype=np.uint64)
        gpu_regions = np.frombuffer(r.gpu_regions, dtype=np.uint8)
        gpu_offsets = np.frombuffer(r.gpu_offsets, dtype=np.uint64)
        if (len(status) != len(HashList(hashes)) or len(offsets) != len(status)
                or len(gpu_regions) not in (0, len(status)) or len(gpu_offsets) != len(gpu_regions)):
            log.warning("reserve: malformed reply ignored")
            self.release(r.lease_id)
            return None
        return Reservation(r.lease_id, status, offsets, r.boot_id, gpu_regions, gpu_offsets)

    def commit(self, lease_id: int, hashes: bytes = b"", checksums: Sequence[int] | None = None) -> int:
        """Publish written chunks (all of the lease when ``hashes`` is empty). 0 on failure."""
        packed = P.pack_u64(checksums) if checksums else b""
        try:
            r = self.call(P.Commit(0, lease_id, hashes, packed), retry=False)
        except SidecarError as e:
            log.debug("commit: not stored (%s)", e)
            return 0
        assert isinstance(r, P.CommitReply)
        return r.committed

    def release(self, lease_id: int) -> bool:
        if not lease_id:
            return True
        try:
            self.call(P.Release(0, lease_id), retry=False)
            return True
        except SidecarError as e:
            log.debug("release of lease %d failed (%s)", lease_id, e)
            return False

    def report_corrupt(self, namespace: bytes, hashes: bytes, checksums: Sequence[int]) -> int:
        """Tell the sidecar these chunks failed their checksum after a load (``checksums``:
        the ones the LOOKUP gave): it drops them. The number dropped; 0 on any failure."""
        try:
            r = self.call(P.Corrupt(0, namespace, hashes, P.pack_u64(checksums)), retry=False)
        except SidecarError as e:
            log.debug("corrupt report not delivered (%s)", e)
            return 0
        assert isinstance(r, P.CorruptReply)
        return r.dropped

    @property
    def verify(self) -> bool:
        """Whether the sidecar (as of the last HELLO) wants checksums at COMMIT."""
        hello = self.hello
        return hello is not None and hello.verify

    def ping(self, probe: bool = False) -> bool:
        """Heartbeat. ``probe``: try even while backing off (the heartbeat thread's job)."""
        try:
            self.call(P.Ping(0), probe=probe)
            return True
        except SidecarError:
            return False

    def leases_alive(self, lease_ids: list[int]) -> bytes | None:
        """One byte per lease id, 1 if it is alive now; None if the sidecar did not answer.
        Tries even while backing off: a loader asks right after its copy."""
        try:
            r = self.call(P.Ping(0, list(lease_ids)), probe=True)
        except SidecarError:
            return None
        assert isinstance(r, P.PingReply)
        return r.alive if len(r.alive) == len(lease_ids) else None

    # -- admin: raise -------------------------------------------------------------------------

    def stats(self) -> dict:
        r = self.call(P.Stats(0))
        assert isinstance(r, P.StatsReply)
        return r.snapshot

    def clear(self, namespace: bytes | None = None, token: bytes | None = None) -> int:
        r = self.call(P.Clear(0, token, namespace))
        assert isinstance(r, P.ClearReply)
        return r.dropped

    # -- memory -----------------------------------------------------------------------------

    def host_tensor(self) -> torch.Tensor | None:
        """The sidecar's host region as a uint8 tensor, mapped once per region identity.
        None if not connected or the region cannot be mapped (the caller treats it as a miss)."""
        from lmkv_mp.memory import HostRegion, RegionError, pool_uuid

        with self._lock:
            if self.hello is None and not self.connect():
                return None
            assert self.hello is not None
            info = next((r for r in self.hello.regions if r.region_id == 0), None)
            if info is None:
                return None
            if self._region is None or getattr(self._region, "uuid", None) != info.uuid:
                try:
                    region = HostRegion.attach(info.kind, info.name, info.size)
                except RegionError as e:
                    self._region_problem(f"host region unavailable: {e} (loads and stores are misses; "
                                         "a sidecar restart recreates it)")
                    return None
                if pool_uuid(region.view) != info.uuid:
                    # Removed and recreated by someone else: never the sidecar's slots.
                    region.close()
                    self._region_problem(f"host region {info.name} is not the sidecar's pool (its uuid "
                                         "differs): loads and stores are misses until the sidecar restarts")
                    return None
                region.uuid = info.uuid  # type: ignore[attr-defined]
                if self._region is not None:
                    self._old_regions.append(self._region)  # tensors may still view it
                self._region = region
            return self._region.tensor()

    def gpu_region(self, region_id: int) -> P.RegionInfo | None:
        """The GPU tier region ``region_id`` if it is on this client's device (as of the last
        HELLO), else None: copies elsewhere are read through the host tier."""
        hello = self.hello
        if hello is None or not region_id or not self.device:
            return None
        return next((r for r in hello.regions if r.region_id == region_id and r.kind in ("cuda", "cuda-vmm")
                     and r.device_uuid == self.device), None)

    def _region_problem(self, message: str) -> None:
        """Warn once per problem (every load and store asks again; the log must not flood)."""
        if message != self._region_warned:
            self._region_warned = message
            log.warning("%s", message)

    # -- plumbing -----------------------------------------------------------------------------

    def call(self, msg: P.Request, retry: bool = True, probe: bool = False) -> P.Reply:
        """Send one request and wait for its reply within the deadline. Raises SidecarError
        on an error reply, SidecarUnavailable on no answer. Re-HELLOs when the sidecar does
        not know us (restart or expiry) and, if ``retry``, sends the request once more.

        After a failure, calls fail at once: while a heartbeat thread runs, until its probe
        (``probe=True``) gets an answer; without one, for ``retry_interval``. So a dead
        sidecar costs the engine one short wait, not one per call."""
        start = time.monotonic()
        if not self._lock.acquire(timeout=self.config.timeout):  # a probe holds it: no waiting on it
            raise SidecarUnavailable("sidecar busy (another call of this client is still waiting)")
        try:
            deadline = start + self.config.timeout
            if self._down_until and not probe and (self._hb is not None or time.monotonic() < self._down_until):
                raise SidecarUnavailable("sidecar unreachable recently; backing off")
            if not self._registered and not isinstance(msg, (P.Hello, P.Stats)):
                self._hello(deadline)
            reply = self._roundtrip(msg, deadline)
            if isinstance(reply, P.ErrorReply) and reply.code == P.ErrorCode.NOT_REGISTERED:
                self._registered = False
                if not retry:
                    raise SidecarError(reply.code, reply.message)
                self._hello(deadline)
                reply = self._roundtrip(msg, deadline)
            if isinstance(reply, P.ErrorReply):
                raise SidecarError(reply.code, reply.message)
            return reply
        finally:
            self._lock.release()

    def _hello(self, deadline: float) -> None:
        msg = P.Hello(0, P.PROTOCOL_VERSION, self.role, os.getpid(), self.name, list(self.namespaces),
                      self.config.auth_token, self.device)
        reply = self._roundtrip(msg, deadline)
        if isinstance(reply, P.ErrorReply):
            raise SidecarError(reply.code, reply.message)
        assert isinstance(reply, P.HelloReply)
        self.hello = reply
        self._registered = True
        self._hb_wake.set()

    def _roundtrip(self, msg: P.Request, deadline: float) -> P.Reply:
        rid = next(self._ids)
        frames = P.encode_request(msg, rid)
        sock = self._sock
        try:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # not connected (yet): wait for the pipe within the deadline
                # A live sidecar's pipe is up within milliseconds (ZeroMQ reconnects in the
                # background); waiting the whole deadline for a dead one would stall the engine.
                grace = min(deadline, time.monotonic() + CONNECT_GRACE)
                if not sock.poll(self._ms_left(grace), zmq.POLLOUT):
                    raise self._down(f"no sidecar listening at {self.config.endpoint}") from None
                sock.send_multipart(frames, zmq.NOBLOCK)
            while True:
                if not self._poller.poll(self._ms_left(deadline)):
                    raise self._down(f"no reply from the sidecar within {self.config.timeout:g}s "
                                     "(LMKV_CLIENT_TIMEOUT / lmkv.timeout sets the deadline)")
                got = sock.recv_multipart(zmq.NOBLOCK)
                if P.peek_req_id(got) == rid:
                    reply = P.decode_reply(msg.OP, got)
                    break
                # else: a late reply to a request that already timed out
        except zmq.ZMQError as e:
            raise self._down(f"socket error: {e}") from None
        except P.ProtocolError as e:
            raise SidecarError(e.code, f"bad reply: {e.message}") from None
        if reply.boot_id != self._boot_id:
            if self._boot_id:
                self.restarts += 1
                self._registered = isinstance(reply, P.HelloReply)
                log.info("restart detected: sidecar boot_id %s -> %s", self._boot_id.hex(), reply.boot_id.hex())
            self._boot_id = reply.boot_id
        self._last_ok = time.monotonic()
        self._down_until = 0.0  # it answered: an explicit connect() ends a back-off early
        return reply

    @staticmethod
    def _ms_left(deadline: float) -> int:
        return max(0, int((deadline - time.monotonic()) * 1000))

    def _down(self, why: str) -> SidecarUnavailable:
        self._down_until = time.monotonic() + self.config.retry_interval
        self._registered = False
        return SidecarUnavailable(why)

    def _heartbeat_period(self) -> float:
        """The configured interval, or the sidecar's (announced in HELLO) when shorter: a client
        beating slower than the sidecar expects would lose its leases between beats."""
        hello = self.hello
        if hello is not None and 0 < hello.heartbeat_interval < self.config.heartbeat_interval:
            return hello.heartbeat_interval
        return self.config.heartbeat_interval

    def _heartbeat(self) -> None:
        while True:
            self._hb_wake.wait(self._heartbeat_period() / 2)
            self._hb_wake.clear()
            if self._closed.is_set():
                return
            interval = self._heartbeat_period()
            if time.monotonic() - self._last_ok < interval / 2:
                continue
            if time.monotonic() < self._down_until:
                continue
            self.ping(probe=True)

    def close(self) -> None:
        self._closed.set()
        self._hb_wake.set()
        if self._hb is not None:
            self._hb.join(timeout=2)
        with self._lock:
            self._sock.close(linger=0)
            for region in [self._region, *self._old_regions]:
                if region is not None:
                    try:
                        region.close()
                    except BufferError:
                        pass  # tensors still view it: the mapping goes when they do
            self._region = None
            self._old_regions.clear()

    def __enter__(self) -> "SidecarClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
