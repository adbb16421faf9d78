"""The sidecar: one ROUTER loop that decodes a request, calls the index, encodes a reply.

``Sidecar.run`` reads as ``while running: serve ready sockets; reap silent clients``. It
owns every socket; nothing else in the process touches them. Bad input never escapes the
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
from pathlib import Path
from typing import Callable

import zmq

from lmkv_mp.wire import protocol as P
from lmkv_mp.sidecar.access import token_ok
from lmkv_mp.sidecar.clients import ClientState, ParkedWrites
from lmkv_mp.config import SidecarConfig
from lmkv_mp.sidecar.gpu_tier import GpuTier
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.sidecar.index.leases import LeaseError
from lmkv_mp.memory import RegionError
from lmkv_mp.sidecar.metrics import STATS_TOPIC, MetricsServer, SidecarCounters, SnapshotBroker, op_label, snapshot
from lmkv_mp.sidecar.startup import (Locks, StartupError, bind, open_gpu_regions, open_host_pool, open_lower_tiers,
                             open_run_dir, start_metrics)
from lmkv_mp.wire.checksum import checksum
from lmkv_mp.sidecar.tiers.hierarchy import TierHierarchy

log = logging.getLogger("lmkv.server")

MAX_LEASES_PER_CLIENT = 4096
# Bounds on what clients can make the sidecar remember (each HELLO may declare 256
# namespaces, and every new routing id is a new client until it is reaped).
MAX_NAMESPACES_PER_CLIENT = 1024
MAX_NAMESPACES = 65536
MAX_CLIENTS = 4096
# A loader reports the one chunk that failed; the sidecar re-hashes each one it is told of.
MAX_CORRUPT_PER_REPORT = 64
HOST_REGION_ID = 0


class Sidecar:
    """The daemon. Construct, then :meth:`run` until :meth:`request_stop` or a signal."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.boot_id = os.urandom(16)
        self.counters = SidecarCounters()
        self.clients: dict[bytes, ClientState] = {}
        self._next_client = 1
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
        self._handlers: dict[type, Callable[[bytes, P.Request], P.Reply]] = {
            P.Hello: self._hello, P.Lookup: self._lookup, P.Reserve: self._reserve, P.Commit: self._commit,
            P.Release: self._release, P.Ping: self._ping, P.Stats: self._stats, P.Clear: self._clear,
            P.Corrupt: self._corrupt,
        }
        try:
            self.metrics = start_metrics(cfg, self.broker)
        except StartupError:
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
            elif not isinstance(msg, (P.Hello, P.Stats)) or (not stats_only and self.cfg.client_token is not None
                                                              and isinstance(msg, P.Stats)):
                # STATS needs no HELLO (lmkv-stats), except on a control socket that asks
                # every client for a token: the snapshot names the node's models.
                raise P.ProtocolError(P.ErrorCode.NOT_REGISTERED,
                                      "unknown client (sidecar restarted or your lease expired): send HELLO")
            reply = self._handlers[type(msg)](ident, msg)
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
        return P.encode_reply(P.ErrorReply(P.peek_req_id(frames), self.boot_id, int(code), message))

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

    def _forget_namespaces(self) -> None:
        """Make room in the namespace table: forget those no connected client declares and no
        host entry uses (models no longer served), with their names and hit counts."""
        keep: set[bytes] = set().union(*(c.namespaces for c in self.clients.values()))
        gone = self.index.forget_namespaces(keep)
        for ns in gone:
            self.ns_names.pop(ns, None)
            self.counters.ns_hits.pop(ns, None)
        log.info("namespace table full: forgot %d namespaces no client declares and no entry uses", len(gone))

    def _stale_lease(self, client: ClientState, lease_id: int, e: LeaseError) -> P.ProtocolError:
        """The error for a COMMIT or RELEASE of a lease this client does not hold; a parked
        lease of the same process is freed now (its writer is done with its slots)."""
        self._parked.done(lease_id, client.pid)
        return P.ProtocolError(P.ErrorCode.UNKNOWN_LEASE, str(e.args[0]))

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

    # -- handlers ---------------------------------------------------------------------------

    def _client(self, ident: bytes) -> ClientState:
        return self.clients[ident]

    def _hello(self, ident: bytes, msg: P.Hello) -> P.HelloReply:
        if msg.version != P.PROTOCOL_VERSION:
            raise P.ProtocolError(P.ErrorCode.VERSION,
                                  f"protocol version {msg.version} is not supported; this sidecar speaks "
                                  f"{P.PROTOCOL_VERSION}: upgrade lmkv_mp on one side")
        if self.cfg.client_token is not None and not token_ok(msg.token, self.cfg.client_token):
            raise P.ProtocolError(P.ErrorCode.UNAUTHORIZED, "HELLO needs the client token: point LMKV_TOKEN_FILE "
                                  "at the file the sidecar's --client-token-file names")
        client = self.clients.get(ident)
        if client is None and len(self.clients) >= MAX_CLIENTS:
            raise P.ProtocolError(P.ErrorCode.QUOTA, f"the sidecar serves {MAX_CLIENTS} clients already: "
                                  "retry after idle ones are reaped (--lease-timeout)")
        new = [ns for ns in msg.namespaces if ns.id not in (client.namespaces if client else ())]
        if len(new) + (len(client.namespaces) if client else 0) > MAX_NAMESPACES_PER_CLIENT:
            raise P.ProtocolError(P.ErrorCode.QUOTA, f"a client may declare at most {MAX_NAMESPACES_PER_CLIENT} "
                                  "namespaces: use another connection for more")
        unknown = sum(self.index.chunk_bytes(ns.id) is None for ns in new)
        if unknown and unknown + self.index.namespace_count() > MAX_NAMESPACES:
            self._forget_namespaces()
            if unknown + self.index.namespace_count() > MAX_NAMESPACES:
                raise P.ProtocolError(P.ErrorCode.QUOTA, f"the sidecar holds {MAX_NAMESPACES} namespaces that "
                                      "connected clients declare or cached chunks use")
        try:  # all or nothing: a HELLO refused half-way leaves no namespace behind
            self.index.declare_all([(ns.id, ns.chunk_bytes) for ns in msg.namespaces])
        except ValueError as e:
            raise P.ProtocolError(P.ErrorCode.CONFLICT, str(e)) from None
        for ns in msg.namespaces:
            if ns.name:
                self.ns_names[ns.id] = ns.name[:200]
        if client is None:
            client = ClientState(self._next_client, msg.role, msg.pid, msg.name[:200], time.monotonic())
            self._next_client += 1
            self.clients[ident] = client
            log.info("client joined: id=%d role=%s pid=%d name=%s", client.client_id, msg.role, msg.pid, client.name)
        client.namespaces.update(ns.id for ns in msg.namespaces)
        client.gpu_region = self.gpu.region_for(msg.device) if self.gpu is not None else 0
        regions = [P.RegionInfo(HOST_REGION_ID, self.region.kind, self.region.name, self.region.size, self.pool.uuid)]
        if self.gpu is not None:
            regions += self.gpu.infos()
        return P.HelloReply(msg.req_id, self.boot_id, client.client_id, self.cfg.chunk_tokens, self.cfg.hash_key,
                            self.cfg.lease_timeout, self.cfg.heartbeat_interval, regions, self.cfg.verify)

    def _lookup(self, ident: bytes, msg: P.Lookup) -> P.LookupReply:
        hashes = HashList(msg.hashes)
        self.counters.lookups += 1
        self.counters.lookup_chunks += len(hashes)
        if not msg.pin:
            hits = self.index.lookup(msg.namespaces, hashes)
            self._count_hits(msg.namespaces, hits)
            return P.LookupReply(msg.req_id, self.boot_id, hits, pending=self._prefetch(msg.namespaces, hashes, hits))
        client = self._client(ident)
        self._check_quota(client)
        pinned = self.index.pin(client.client_id, msg.namespaces, hashes, self._share_bytes())
        self._count_hits(msg.namespaces, pinned.hits)
        for ns in msg.namespaces:
            nbytes = self.index.chunk_bytes(ns) or 0
            self.counters.loads += pinned.hits
            self.counters.loaded_bytes += pinned.hits * nbytes
        return P.LookupReply(msg.req_id, self.boot_id, pinned.hits, pinned.lease_id,
                             [P.U64Array(o) for o in pinned.offsets],
                             [P.U64Array(c) for c in pinned.checksums] if self.cfg.verify else [],
                             self._prefetch(msg.namespaces, hashes, pinned.hits),
                             [bytes(r) for r in pinned.gpu_regions], [P.U64Array(o) for o in pinned.gpu_offsets])

    def _prefetch(self, namespaces: list[bytes], hashes: HashList, hits: int) -> int:
        """Start promoting the chunks after the host hits from lower tiers; how many may come."""
        if self.tiers is None or hits >= len(hashes) or not namespaces:
            return 0
        pending = self.tiers.prefetch(namespaces, hashes.split(), hits)
        log.debug("lookup: %d of %d chunks hit, %d pending", hits, len(hashes), pending)
        return pending

    def _count_hits(self, namespaces: list[bytes], hits: int) -> None:
        self.counters.hit_chunks += hits
        if hits:
            for ns in namespaces:
                self.counters.ns_hits[ns] += hits

    def _reserve(self, ident: bytes, msg: P.Reserve) -> P.ReserveReply:
        client = self._client(ident)
        if msg.namespace not in client.namespaces:
            raise P.ProtocolError(P.ErrorCode.UNKNOWN_NAMESPACE,
                                  f"namespace {msg.namespace.hex()} was not declared in this client's HELLO")
        self._check_quota(client)
        r = self.index.reserve(client.client_id, msg.namespace, HashList(msg.hashes), self._share_bytes(),
                               client.gpu_region)
        return P.ReserveReply(msg.req_id, self.boot_id, r.lease_id, bytes(r.status), P.U64Array(r.offsets),
                              bytes(r.gpu_regions), P.U64Array(r.gpu_offsets))

    def _share_bytes(self) -> int:
        """Slot bytes one client may hold in write leases, and apart in read pins."""
        return int(self.cfg.client_pool_share * self.pool.alloc_state.capacity_bytes)

    def _commit(self, ident: bytes, msg: P.Commit) -> P.CommitReply:
        client = self._client(ident)
        sums = msg.checksums.tolist() if msg.checksums else None
        if self.cfg.verify and sums is None:
            # A chunk without a checksum could never be verified on load: not stored. The
            # lease ends here, so its slots come back now rather than when the client goes.
            try:
                self.index.release(client.client_id, msg.lease_id)
            except LeaseError as e:
                raise self._stale_lease(client, msg.lease_id, e) from None
            raise P.ProtocolError(P.ErrorCode.BAD_REQUEST, "this sidecar runs --verify on: COMMIT must list the "
                                  "chunks written with one checksum each; nothing was stored")
        try:
            done = self.index.commit_entries(client.client_id, msg.lease_id, HashList(msg.hashes), sums)
        except LeaseError as e:
            raise self._stale_lease(client, msg.lease_id, e) from None
        n = len(done)
        if self.tiers is not None:
            self.tiers.committed(done)
        self.counters.stores += n
        self.counters.stored_bytes = self.index.counters.committed_bytes
        return P.CommitReply(msg.req_id, self.boot_id, n)

    def _release(self, ident: bytes, msg: P.Release) -> P.ReleaseReply:
        client = self._client(ident)
        try:
            n = self.index.release(client.client_id, msg.lease_id)
        except LeaseError as e:
            raise self._stale_lease(client, msg.lease_id, e) from None
        return P.ReleaseReply(msg.req_id, self.boot_id, n)

    def _corrupt(self, ident: bytes, msg: P.Corrupt) -> P.CorruptReply:
        """A loader found chunks whose bytes do not match their checksum: drop them (a miss
        from now on), count each under error code CORRUPT. The sidecar hashes each reported
        slot itself first (~4 ms per 32 MiB, on this rare path), so only real mismatches go;
        without --verify there is nothing to check against and the report is refused."""
        if not self.cfg.verify:
            raise P.ProtocolError(P.ErrorCode.BAD_REQUEST, "this sidecar runs --verify off: no checksums to check "
                                  "a CORRUPT report against")
        hashes = HashList(msg.hashes)
        if len(hashes) > MAX_CORRUPT_PER_REPORT:
            raise P.ProtocolError(P.ErrorCode.TOO_LARGE, f"CORRUPT names at most {MAX_CORRUPT_PER_REPORT} chunks")
        n = self.index.drop_corrupt(msg.namespace, hashes, msg.checksums)
        if n:
            self.counters.errors[P.ErrorCode.CORRUPT.name] += n
            log.warning("error: %d chunk(s) of namespace %s failed their checksum on load (client %d): dropped",
                        n, msg.namespace.hex(), self._client(ident).client_id)
        return P.CorruptReply(msg.req_id, self.boot_id, n)

    def _ping(self, ident: bytes, msg: P.Ping) -> P.PingReply:
        return P.PingReply(msg.req_id, self.boot_id, self.index.owner_lease_count(self._client(ident).client_id),
                           self.index.leases.alive(msg.leases))

    def _stats(self, ident: bytes, msg: P.Stats) -> P.StatsReply:
        return P.StatsReply(msg.req_id, self.boot_id, self.snapshot())

    def publish(self) -> None:
        """Send a fresh snapshot to the PUB socket's subscribers (frames: the topic, then a
        StatsReply with req_id 0) and hand it to the broker's readers."""
        snap = self.snapshot()
        self.broker.put(snap)
        if self.publisher is not None:
            self.publisher.send_multipart([STATS_TOPIC, *P.encode_reply(P.StatsReply(0, self.boot_id, snap))])

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
        roles: dict[str, int] = {}
        for c in self.clients.values():
            roles[c.role.value] = roles.get(c.role.value, 0) + 1
        snap = snapshot(self.boot_id, self.counters, self.index, roles, self.ns_names, info=self._info())
        snap["evicted_dirty"] = self.index.counters.evicted_dirty
        snap["corrupt_chunks"] = self.index.counters.corrupt
        snap["quota_refused_chunks"] = self.index.counters.quota_refused
        snap["host_pool_linked"] = not self._region_gone
        snap["parked_slots"] = self.index.parked_slots()
        if self.tiers is not None:
            snap["tiers"].update(self.tiers.stats())
            snap["tier_movers"] = self.tiers.activity()
        if self.gpu is not None:
            snap["tiers"].update(self.gpu.stats())
        return snap

    def _clear(self, ident: bytes, msg: P.Clear) -> P.ClearReply:
        if self.cfg.admin_token is None:
            # No token configured means admin ops are refused (ARCHITECTURE §7), not open to all.
            raise P.ProtocolError(P.ErrorCode.UNAUTHORIZED,
                                  "admin ops are disabled: start the sidecar with --admin-token-file")
        if not token_ok(msg.token, self.cfg.admin_token):
            raise P.ProtocolError(P.ErrorCode.UNAUTHORIZED, "CLEAR needs the admin token (--admin-token-file)")
        n = self.index.clear(msg.namespace)
        lower = self.tiers.clear(msg.namespace) if self.tiers is not None else 0
        log.info("clear: %d entries dropped, %d lower-tier records queued for deletion (%s)", n, lower,
                 msg.namespace.hex() if msg.namespace else "all namespaces")
        return P.ClearReply(msg.req_id, self.boot_id, n)

    def _check_quota(self, client: ClientState) -> None:
        if self.index.owner_lease_count(client.client_id) >= MAX_LEASES_PER_CLIENT:
            raise P.ProtocolError(P.ErrorCode.QUOTA,
                                  f"client holds {MAX_LEASES_PER_CLIENT} leases: release some before taking more")


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
