"""The sidecar's loop: it owns every socket, admits each request and dispatches it.

``Sidecar.run`` reads as ``while running: serve ready sockets; reap silent clients``. It
owns every socket; nothing else in the process touches them. The requests themselves are
served by the handlers it registers (:mod:`lmkv_mp.sidecar.handlers`, one per op, each
checked at start to take the request type its op decodes to). Bad input never escapes the
loop: a request that fails to decode or to apply becomes an error reply with a stable code
(:class:`~lmkv_mp.wire.protocol.ErrorCode`), and the loop goes on serving everyone else.

Liveness: every message from a client renews it. A client silent for ``lease_timeout`` is
reaped: its read leases unpin, its write leases free their uncommitted slots.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import typing
from pathlib import Path

import zmq

from lmkv_mp.config import SidecarConfig
from lmkv_mp.memory import RegionError
from lmkv_mp.sidecar.clients import ClientState, ParkedWrites
from lmkv_mp.sidecar.gpu_tier import GpuTier
from lmkv_mp.sidecar.handlers import Handler, Handlers
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.sidecar.metrics import STATS_TOPIC, MetricsServer, SidecarCounters, SnapshotBroker, op_label, snapshot
from lmkv_mp.sidecar.startup import (Locks, StartupError, bind, open_gpu_regions, open_host_pool, open_lower_tiers,
                                     open_run_dir, start_metrics)
from lmkv_mp.sidecar.tiers.hierarchy import TierHierarchy
from lmkv_mp.wire import protocol as P
from lmkv_mp.wire.checksum import checksum

log = logging.getLogger("lmkv.server")


def may_precede_hello(msg: P.Request, stats_only: bool, client_token: bytes | None) -> bool:
    """Whether a client the sidecar does not know (never registered, or reaped) may send
    ``msg``: the ops of :data:`~lmkv_mp.wire.protocol.OPS_BEFORE_HELLO` (HELLO, and STATS
    for ``lmkv-stats``), except STATS on a control socket that asks every client for a
    token (``client_token``): the snapshot names the node's models. Anything else gets
    NOT_REGISTERED, and the client re-HELLOs."""
    if msg.OP not in P.OPS_BEFORE_HELLO:
        return False
    return msg.OP is not P.Op.STATS or stats_only or client_token is None


def register(table: dict[P.Op, Handler]) -> dict[P.Op, Handler]:
    """The dispatch table, once checked: a handler for every op, each taking the request
    type its op decodes to and returning that op's reply type (a mismatch is a bug: it
    fails at start, not on the first such request)."""
    if set(table) != set(P.Op):
        raise TypeError(f"handlers missing for {sorted(op.name for op in set(P.Op) - set(table))}")
    for op, handler in table.items():
        hints = typing.get_type_hints(handler)
        params = [h for name, h in hints.items() if name != "return"]
        if params != [bytes, P.REQUEST_TYPES[op]] or hints.get("return") is not P.REPLY_TYPES[op]:
            raise TypeError(f"the {op.name} handler {handler.__qualname__} must take (bytes, "
                            f"{P.REQUEST_TYPES[op].__name__}) and return {P.REPLY_TYPES[op].__name__}")
    return dict(table)


class Sidecar:
    """The daemon. Construct, then :meth:`run` until :meth:`request_stop` or a signal."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.boot_id = os.urandom(16)
        self.counters = SidecarCounters()
        self.clients: dict[bytes, ClientState] = {}
        self._running = False
        self._locks = Locks()
        self.access = open_run_dir(cfg, self._locks)
        self.region, self.pool, records = open_host_pool(cfg, self.access, self._locks)
        self._region_gone = False
        self.gpu: GpuTier | None = None
        try:
            regions = open_gpu_regions(cfg)
            if regions:
                try:
                    self.gpu = GpuTier(regions, cfg.run_dir, cfg.slab_size, self.pool.geo.min_slot_bytes,
                                       self.access.umask, self.access.gid)
                except OSError as e:  # GpuTier has closed the regions
                    raise StartupError(f"cannot bind the GPU handle socket in {cfg.run_dir}: {e}") from e
        except BaseException:
            self._abandon_pool()
            raise
        self.index = ChunkIndex(self.pool, self.gpu.copies if self.gpu is not None else None)
        self._parked = ParkedWrites(self.index)
        restored = self.index.restore(records, require_checksum=cfg.verify)
        if self.index.counters.unverified:
            log.warning("memory: %d warm chunks had no checksum (stored with --verify off): dropped",
                        self.index.counters.unverified)
        if cfg.verify:
            view = self.region.view
            self.index.checksum_at = lambda off, n: checksum(view[off:off + n])
        self.ns_names: dict[bytes, str] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.tiers: TierHierarchy | None = None
        lower = open_lower_tiers(cfg, self._locks)
        if lower:
            self.tiers = TierHierarchy(self.index, self.region.view, lower, cfg.write_policy, self._wake)
        self.ctx = zmq.Context.instance()
        self.control = bind(self.ctx, zmq.ROUTER, cfg.endpoint, cfg.client_max_inflight, self.access)
        self.stats = bind(self.ctx, zmq.ROUTER, cfg.stats_endpoint, cfg.client_max_inflight, self.access)
        # Snapshots also go out on an XPUB socket every --stats-interval while anyone listens
        # (a snapshot walks the index), and to the Prometheus server's threads through the
        # broker (those threads never touch the loop's state).
        self.publisher = (bind(self.ctx, zmq.XPUB, cfg.stats_publish_endpoint, cfg.client_max_inflight, self.access)
                          if cfg.stats_interval else None)
        self._sockets = [sock for sock in (self.control, self.stats, self.publisher) if sock is not None]
        self._subscribed: set[bytes] = set()  # topic prefixes someone subscribed to
        self.broker = SnapshotBroker(self._wake)
        self.metrics: MetricsServer | None = None
        log.info("start: boot_id=%s endpoint=%s host_pool=%s (%d bytes, %s, %d chunks warm)",
                 self.boot_id.hex(), cfg.endpoint, self.region.name, self.region.size,
                 "created" if self.region.created else "re-attached", restored)
        self.handlers = Handlers(cfg=cfg, boot_id=self.boot_id, index=self.index, pool=self.pool, region=self.region,
                                 gpu=self.gpu, tiers=self.tiers, counters=self.counters, clients=self.clients,
                                 parked=self._parked, ns_names=self.ns_names, snapshot=self.snapshot)
        try:
            self._dispatch = register(self.handlers.table())
            self.metrics = start_metrics(cfg, self.broker)
        except (StartupError, TypeError):
            self.close()
            raise

    def _abandon_pool(self) -> None:
        """Let go of what the constructor took before a failure (the pool stays for a restart)."""
        self.pool.close()
        self.region.close()
        self._locks.release()

    def _wake(self) -> None:
        """Wake the loop (from a mover thread): a byte on the socketpair it polls."""
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closing

    # -- loop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._running = False
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass

    def run(self) -> None:
        """Serve until stopped; then close sockets and unmap (always, in ``finally``)."""
        self._running = True
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.stats, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        if self.publisher is not None:
            poller.register(self.publisher, zmq.POLLIN)  # (un)subscriptions
        handles = self.gpu.handles if self.gpu is not None else None
        if handles is not None:  # VMM regions' fds reach workers over their own unix socket
            poller.register(handles.fileno(), zmq.POLLIN)
        tick = max(0.05, min(self.cfg.heartbeat_interval, self.cfg.lease_timeout / 4))
        next_reap = time.monotonic() + tick
        next_publish = time.monotonic() + self.cfg.stats_interval if self.publisher is not None else float("inf")
        try:
            while self._running:
                timeout_ms = max(0, int((min(next_reap, next_publish) - time.monotonic()) * 1000))
                ready = dict(poller.poll(timeout_ms))
                if self.control in ready:
                    self._drain(self.control, stats_only=False)
                if self.stats in ready:
                    self._drain(self.stats, stats_only=True)
                if self._wake_r.fileno() in ready:
                    self._wake_r.recv(4096)
                if handles is not None and handles.fileno() in ready:
                    handles.serve()
                if self.broker.wanted:
                    self.broker.put(self.snapshot())
                if self.publisher is not None and self.publisher in ready:
                    self._track_subscriptions(self.publisher)
                if self.tiers is not None:
                    self.tiers.collect()
                now = time.monotonic()
                if now >= next_publish:
                    if any(STATS_TOPIC.startswith(topic) for topic in self._subscribed):
                        self.publish()
                    next_publish = now + self.cfg.stats_interval
                if now >= next_reap:
                    self.reap(now)
                    self._check_region()
                    if self.tiers is not None:
                        self.tiers.tick()
                    next_reap = now + tick
        finally:
            self.close()

    def _drain(self, sock: zmq.Socket, stats_only: bool) -> None:
        """Serve what is queued, but bounded, so one busy socket cannot starve the other."""
        for _ in range(256):
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a zmq.Again per drain
                return
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            if len(frames) < 2:
                continue  # no routing id: cannot answer
            ident, body = frames[0], frames[1:]
            t0 = time.perf_counter()
            sock.send_multipart([ident, *self.handle(ident, body, stats_only)])
            self.counters.observe(op_label(body), time.perf_counter() - t0)

    def handle(self, ident: bytes, frames: list[bytes], stats_only: bool = False) -> list[bytes]:
        """One request's frames → the reply's frames. Never raises."""
        op_name = op_label(frames)  # the op byte's name even if the rest fails to decode
        try:
            msg = P.decode_request(frames)
            op_name = msg.OP.name
            if stats_only and not isinstance(msg, P.Stats):
                raise P.ProtocolError(P.ErrorCode.UNKNOWN_OP, "the stats socket only answers STATS")
            client = self.clients.get(ident)
            if client is not None:
                client.last_seen = time.monotonic()
            elif not may_precede_hello(msg, stats_only, self.cfg.client_token):
                raise P.ProtocolError(P.ErrorCode.NOT_REGISTERED,
                                      "unknown client (sidecar restarted or your lease expired): send HELLO")
            reply = self._dispatch[msg.OP](ident, msg)
            self.counters.requests[f"{op_name}:ok"] += 1
            return P.encode_reply(reply)
        except P.ProtocolError as e:
            return self._error(frames, op_name, e.code, e.message)
        except Exception as e:  # a bug must not take the node's cache down
            log.exception("error: internal error serving %s", op_name)
            return self._error(frames, op_name, P.ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _error(self, frames: list[bytes], op_name: str, code: P.ErrorCode, message: str) -> list[bytes]:
        self.counters.requests[f"{op_name}:error"] += 1
        self.counters.errors[code.name] += 1
        log.debug("request %s rejected: %s: %s", op_name, code.name, message)
        return P.encode_reply(P.ErrorReply(req_id=P.peek_req_id(frames), boot_id=self.boot_id, code=int(code),
                                           message=message))

    def reap(self, now: float) -> None:
        """Drop clients silent for longer than the lease timeout, with all their leases.

        The write slots of one whose process lives are parked instead (see
        :mod:`lmkv_mp.sidecar.clients`): it may only be stopped in the middle of a copy into them."""
        for ident, c in list(self.clients.items()):
            if now - c.last_seen > self.cfg.lease_timeout:
                parked = self._parked.park(c, now)
                n = self.index.drop_owner(c.client_id) + parked
                del self.clients[ident]
                log.info("client reaped: id=%d role=%s pid=%d silent %.1fs, %d leases ended (%d with slots parked)",
                         c.client_id, c.role, c.pid, now - c.last_seen, n, parked)
        self._parked.expire(now)

    def _check_region(self) -> None:
        """Notice (and say once) that the host pool's segment was removed from outside: this
        process and workers that mapped it go on with their mappings, but no new worker can
        attach it (their loads and stores are misses) until the sidecar restarts."""
        if self._region_gone or self.region.linked():
            return
        self._region_gone = True
        log.error("memory: host pool %s was removed from outside: serving from this sidecar's mapping; "
                  "workers that start now cannot attach it (misses) until the sidecar restarts (cold)",
                  self.region.name)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        published = [self.cfg.stats_publish_endpoint] if self.publisher is not None else []
        for ep in (self.cfg.endpoint, self.cfg.stats_endpoint, *published):
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://"):]).unlink(missing_ok=True)
        if self.tiers is not None:
            self.tiers.close()  # before the region is unmapped: movers copy into it
        self._wake_r.close()
        self._wake_w.close()
        self.pool.close()
        self.region.close()
        if self.gpu is not None:
            self.gpu.close()  # after the sockets: no worker is told about it any more
        if self.cfg.unlink_on_exit:
            self.region.unlink()
        self._locks.release()
        log.info("stop: boot_id=%s", self.boot_id.hex())

    # -- stats ------------------------------------------------------------------------------

    def publish(self) -> None:
        """Send a fresh snapshot to the PUB socket's subscribers (frames: the topic, then a
        StatsReply with req_id 0) and hand it to the broker's readers."""
        snap = self.snapshot()
        self.broker.put(snap)
        if self.publisher is not None:
            reply = P.StatsReply(req_id=0, boot_id=self.boot_id, snapshot=snap)
            self.publisher.send_multipart([STATS_TOPIC, *P.encode_reply(reply)])

    def _track_subscriptions(self, sock: zmq.Socket) -> None:
        """XPUB hands the loop the first subscription and the last unsubscription of each
        topic (a subscriber that goes away unsubscribes): one frame, 1 or 0, then the topic."""
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = sock.recv(zmq.NOBLOCK)
            if msg[:1] == b"\x01":
                self._subscribed.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._subscribed.discard(msg[1:])

    def _info(self) -> dict[str, str]:
        """Where this sidecar can be reached, for the snapshot ("" for what is off)."""
        return {"endpoint": self.cfg.endpoint, "stats_endpoint": self.cfg.stats_endpoint,
                "publish_endpoint": self.cfg.stats_publish_endpoint if self.publisher is not None else "",
                "metrics_url": self.metrics.url if self.metrics is not None else ""}

    def snapshot(self) -> dict:
        """The stats snapshot of this moment (metrics.snapshot: one walk over the index)."""
        return snapshot(self.boot_id, self.counters, self.index, self.clients.values(), self.ns_names,
                        info=self._info(), host_pool_linked=not self._region_gone, lower=self.tiers, gpu=self.gpu)


def serve(cfg: SidecarConfig) -> int:
    """Run a sidecar in this process until SIGTERM/SIGINT. Returns the exit status."""
    try:
        sidecar = Sidecar(cfg)
    except (StartupError, RegionError, OSError, ValueError) as e:
        log.error("start failed: %s", e)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.request_stop())
    sidecar.run()
    return 0
