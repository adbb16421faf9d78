"""The sidecar's request handlers: one per op, registered by the loop (server.py).

A handler gets the client's routing id and its decoded, validated request, applies it to
the index (and the tiers), counts it, and returns the reply. A request it refuses raises
:class:`~lmkv_mp.wire.protocol.ProtocolError` with the code and a message that says what
to fix; the loop turns that into an error reply. Handlers hold no sockets: the loop
receives, admits, dispatches through :meth:`Handlers.table`, encodes and sends.

Every handler but HELLO's and STATS's may assume its client is registered: the loop
admits nothing else (``may_precede_hello`` in server.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lmkv_mp.config import SidecarConfig
from lmkv_mp.memory import HostPool, HostRegion
from lmkv_mp.sidecar.access import token_ok
from lmkv_mp.sidecar.clients import ClientState, ParkedWrites
from lmkv_mp.sidecar.gpu_tier import GpuTier
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.sidecar.index.leases import LeaseError
from lmkv_mp.sidecar.metrics import SidecarCounters
from lmkv_mp.sidecar.tiers.hierarchy import TierHierarchy
from lmkv_mp.wire import protocol as P
from lmkv_mp.wire.hashes import HashList

# The server's log: a handler's lines are part of the loop's story.
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

Handler = Callable[[bytes, Any], P.Reply]
"""``(routing id, request) -> reply``; raises ProtocolError to refuse."""


@dataclass(kw_only=True, eq=False, repr=False)
class Handlers:
    """The per-op handlers over the sidecar's state. ``clients`` and ``ns_names`` are the
    loop's maps (shared: HELLO adds to them, the reaper removes); ``snapshot`` builds a
    stats snapshot (the loop's, so STATS answers what every other view shows)."""

    cfg: SidecarConfig
    boot_id: bytes
    index: ChunkIndex
    pool: HostPool
    region: HostRegion
    gpu: GpuTier | None
    tiers: TierHierarchy | None
    counters: SidecarCounters
    clients: dict[bytes, ClientState]
    parked: ParkedWrites
    ns_names: dict[bytes, str]
    snapshot: Callable[[], dict[str, Any]]
    _next_client: int = field(default=1, init=False)

    def table(self) -> dict[P.Op, Handler]:
        """Op -> its handler; the loop checks at start that each takes its op's request type."""
        return {P.Op.HELLO: self.hello, P.Op.LOOKUP: self.lookup, P.Op.RESERVE: self.reserve,
                P.Op.COMMIT: self.commit, P.Op.RELEASE: self.release, P.Op.PING: self.ping,
                P.Op.STATS: self.stats, P.Op.CLEAR: self.clear, P.Op.CORRUPT: self.corrupt}

    # -- HELLO --------------------------------------------------------------------------------

    def hello(self, ident: bytes, msg: P.Hello) -> P.HelloReply:
        """Register (or refresh) a client and its namespaces, all or nothing."""
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
        self._declare(client, msg.namespaces)
        if client is None:
            client = ClientState(self._next_client, msg.role, msg.pid, msg.name[:200], time.monotonic())
            self._next_client += 1
            self.clients[ident] = client
            log.info("client joined: id=%d role=%s pid=%d name=%s", client.client_id, msg.role, msg.pid, client.name)
        client.namespaces.update(ns.id for ns in msg.namespaces)
        client.gpu_region = self.gpu.region_for(msg.device) if self.gpu is not None else 0
        regions = [P.RegionInfo(region_id=HOST_REGION_ID, kind=self.region.kind, name=self.region.name,
                                size=self.region.size, uuid=self.pool.uuid)]
        if self.gpu is not None:
            regions += self.gpu.infos()
        return P.HelloReply(req_id=msg.req_id, boot_id=self.boot_id, client_id=client.client_id,
                            chunk_tokens=self.cfg.chunk_tokens, hash_key=self.cfg.hash_key,
                            lease_timeout=self.cfg.lease_timeout, heartbeat_interval=self.cfg.heartbeat_interval,
                            regions=regions, verify=self.cfg.verify)

    def _declare(self, client: ClientState | None, namespaces: list[P.NamespaceInfo]) -> None:
        """Declare a HELLO's namespaces in the index, within the per-client and the sidecar's
        limits; refused whole, so a HELLO refused half-way leaves no namespace behind."""
        new = [ns for ns in namespaces if ns.id not in (client.namespaces if client else ())]
        if len(new) + (len(client.namespaces) if client else 0) > MAX_NAMESPACES_PER_CLIENT:
            raise P.ProtocolError(P.ErrorCode.QUOTA, f"a client may declare at most {MAX_NAMESPACES_PER_CLIENT} "
                                  "namespaces: use another connection for more")
        unknown = sum(self.index.chunk_bytes(ns.id) is None for ns in new)
        if unknown and unknown + self.index.namespace_count() > MAX_NAMESPACES:
            self._forget_namespaces()
            if unknown + self.index.namespace_count() > MAX_NAMESPACES:
                raise P.ProtocolError(P.ErrorCode.QUOTA, f"the sidecar holds {MAX_NAMESPACES} namespaces that "
                                      "connected clients declare or cached chunks use")
        try:
            self.index.declare_all([(ns.id, ns.chunk_bytes) for ns in namespaces])
        except ValueError as e:
            raise P.ProtocolError(P.ErrorCode.CONFLICT, str(e)) from None
        for ns in namespaces:
            if ns.name:
                self.ns_names[ns.id] = ns.name[:200]

    def _forget_namespaces(self) -> None:
        """Make room in the namespace table: forget those no connected client declares and no
        host entry uses (models no longer served), with their names and hit counts."""
        keep: set[bytes] = set().union(*(c.namespaces for c in self.clients.values()))
        gone = self.index.forget_namespaces(keep)
        for ns in gone:
            self.ns_names.pop(ns, None)
            self.counters.ns_hits.pop(ns, None)
        log.info("namespace table full: forgot %d namespaces no client declares and no entry uses", len(gone))

    # -- LOOKUP -------------------------------------------------------------------------------

    def lookup(self, ident: bytes, msg: P.Lookup) -> P.LookupReply:
        """Leading hits in every namespace; pinned: a read lease and where each hit is."""
        hashes = HashList(msg.hashes)
        self.counters.lookups += 1
        self.counters.lookup_chunks += len(hashes)
        if not msg.pin:
            hits = self.index.lookup(msg.namespaces, hashes)
            self._count_hits(msg.namespaces, hits)
            return P.LookupReply(req_id=msg.req_id, boot_id=self.boot_id, hits=hits,
                                 pending=self._prefetch(msg.namespaces, hashes, hits))
        client = self.clients[ident]
        self._check_quota(client)
        pinned = self.index.pin(client.client_id, msg.namespaces, hashes, self._share_bytes())
        self._count_hits(msg.namespaces, pinned.hits)
        for ns in msg.namespaces:
            nbytes = self.index.chunk_bytes(ns) or 0
            self.counters.loads += pinned.hits
            self.counters.loaded_bytes += pinned.hits * nbytes
        return P.LookupReply(req_id=msg.req_id, boot_id=self.boot_id, hits=pinned.hits, lease_id=pinned.lease_id,
                             offsets=[P.U64Array(o) for o in pinned.offsets],
                             checksums=[P.U64Array(c) for c in pinned.checksums] if self.cfg.verify else [],
                             pending=self._prefetch(msg.namespaces, hashes, pinned.hits),
                             gpu_regions=[bytes(r) for r in pinned.gpu_regions],
                             gpu_offsets=[P.U64Array(o) for o in pinned.gpu_offsets])

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

    # -- writes -------------------------------------------------------------------------------

    def reserve(self, ident: bytes, msg: P.Reserve) -> P.ReserveReply:
        """Write slots (a write lease) for the chunks of a declared namespace not yet stored."""
        client = self.clients[ident]
        if msg.namespace not in client.namespaces:
            raise P.ProtocolError(P.ErrorCode.UNKNOWN_NAMESPACE,
                                  f"namespace {msg.namespace.hex()} was not declared in this client's HELLO")
        self._check_quota(client)
        r = self.index.reserve(client.client_id, msg.namespace, HashList(msg.hashes), self._share_bytes(),
                               client.gpu_region)
        return P.ReserveReply(req_id=msg.req_id, boot_id=self.boot_id, lease_id=r.lease_id, status=bytes(r.status),
                              offsets=P.U64Array(r.offsets), gpu_regions=bytes(r.gpu_regions),
                              gpu_offsets=P.U64Array(r.gpu_offsets))

    def commit(self, ident: bytes, msg: P.Commit) -> P.CommitReply:
        """Publish the written chunks of a write lease (with their checksums under --verify on)."""
        client = self.clients[ident]
        if self.cfg.verify and not msg.checksums:
            # A chunk without a checksum could never be verified on load: not stored. The
            # lease ends here, so its slots come back now rather than when the client goes.
            try:
                self.index.release(client.client_id, msg.lease_id)
            except LeaseError as e:
                raise self._stale_lease(client, msg.lease_id, e) from None
            raise P.ProtocolError(P.ErrorCode.BAD_REQUEST, "this sidecar runs --verify on: COMMIT must list the "
                                  "chunks written with one checksum each; nothing was stored")
        try:
            done = self.index.commit_entries(client.client_id, msg.lease_id, HashList(msg.hashes),
                                             msg.checksums or None)
        except LeaseError as e:
            raise self._stale_lease(client, msg.lease_id, e) from None
        if self.tiers is not None:
            self.tiers.committed(done)
        self.counters.stores += len(done)
        self.counters.stored_bytes = self.index.counters.committed_bytes
        return P.CommitReply(req_id=msg.req_id, boot_id=self.boot_id, committed=len(done))

    def release(self, ident: bytes, msg: P.Release) -> P.ReleaseReply:
        """End a read or write lease of this client."""
        client = self.clients[ident]
        try:
            n = self.index.release(client.client_id, msg.lease_id)
        except LeaseError as e:
            raise self._stale_lease(client, msg.lease_id, e) from None
        return P.ReleaseReply(req_id=msg.req_id, boot_id=self.boot_id, released=n)

    def _stale_lease(self, client: ClientState, lease_id: int, e: LeaseError) -> P.ProtocolError:
        """The error for a COMMIT or RELEASE of a lease this client does not hold; a parked
        lease of the same process is freed now (its writer is done with its slots)."""
        self.parked.done(lease_id, client.pid)
        return P.ProtocolError(P.ErrorCode.UNKNOWN_LEASE, str(e.args[0]))

    def corrupt(self, ident: bytes, msg: P.Corrupt) -> P.CorruptReply:
        """A loader found chunks whose bytes do not match their checksum: drop them (a miss
        from now on), count each under error code CORRUPT. The sidecar hashes each reported
        slot itself first (a rare path), so only real mismatches go; without --verify there
        is nothing to check against and the report is refused."""
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
                        n, msg.namespace.hex(), self.clients[ident].client_id)
        return P.CorruptReply(req_id=msg.req_id, boot_id=self.boot_id, dropped=n)

    def _share_bytes(self) -> int:
        """Slot bytes one client may hold in write leases, and apart in read pins."""
        return int(self.cfg.client_pool_share * self.pool.alloc_state.capacity_bytes)

    def _check_quota(self, client: ClientState) -> None:
        if self.index.owner_lease_count(client.client_id) >= MAX_LEASES_PER_CLIENT:
            raise P.ProtocolError(P.ErrorCode.QUOTA,
                                  f"client holds {MAX_LEASES_PER_CLIENT} leases: release some before taking more")

    # -- PING, STATS, CLEAR -------------------------------------------------------------------

    def ping(self, ident: bytes, msg: P.Ping) -> P.PingReply:
        """Heartbeat (the loop renewed the client on receipt); which asked-about leases live."""
        return P.PingReply(req_id=msg.req_id, boot_id=self.boot_id,
                           leases=self.index.owner_lease_count(self.clients[ident].client_id),
                           alive=self.index.leases.alive(msg.leases))

    def stats(self, ident: bytes, msg: P.Stats) -> P.StatsReply:
        return P.StatsReply(req_id=msg.req_id, boot_id=self.boot_id, snapshot=self.snapshot())

    def clear(self, ident: bytes, msg: P.Clear) -> P.ClearReply:
        """Drop committed entries (of one namespace, or all) and their lower-tier copies;
        admin only."""
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
        return P.ClearReply(req_id=msg.req_id, boot_id=self.boot_id, dropped=n)
