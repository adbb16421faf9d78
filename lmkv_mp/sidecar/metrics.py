"""What the sidecar counts, the stats snapshot built from it, and its Prometheus view
(ARCHITECTURE §9).

Threads (STYLE rule 4): the control loop alone writes :class:`SidecarCounters` (plain ints
and lists, no locks) and alone builds snapshots with :func:`snapshot`, which reads the
index. Every other thread (the Prometheus HTTP server's) only ever sees finished snapshot
dicts, handed over by :class:`SnapshotBroker`; a snapshot is never changed once built.

Snapshot keys are stable; tools may rely on them (README, "Observability"). The Prometheus
view builds every tier-labelled series by iterating ``snapshot["tiers"]``, so a new tier
appears by adding its map; the keys it reads from each tier (absent ones count as 0) are
:data:`TIER_KEYS`.
"""

from __future__ import annotations

import itertools
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from lmkv_mp import __version__
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.wire.protocol import ErrorCode, Op, Role

if TYPE_CHECKING:
    from lmkv_mp.sidecar.clients import ClientState
    from lmkv_mp.sidecar.gpu_tier import GpuTier
    from lmkv_mp.sidecar.tiers.hierarchy import TierHierarchy

LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the request latency buckets: tens of µs (a short LOOKUP) to
seconds (a stalled loop)."""

TIER_KEYS = ("used_bytes", "capacity_bytes", "entries", "entries_by_state", "hit_chunks", "stored_chunks",
             "stored_bytes", "loaded_chunks", "loaded_bytes", "evictions", "evicted_bytes", "prefetches", "errors",
             "corrupt")
"""Per-tier snapshot keys the Prometheus view reads (``entries_by_state`` maps a state to a
count; where it is absent, all ``entries`` count as committed)."""

CLIENT_ROLES = tuple(role.value for role in Role)
"""Roles reported as themselves (every :class:`~lmkv_mp.wire.protocol.Role`); any other
role a snapshot names (one from another version) is counted as ``other``: it must not mint
label values."""

OP_NAMES = tuple(op.name for op in Op) + ("INVALID",)
"""``op`` label values: every op, and INVALID for a request whose op byte names none."""
_OP_BY_FRAME: dict[bytes, str] = {bytes((op,)): op.name for op in Op}

STATS_TOPIC = b"lmkv.stats"
"""First frame of every snapshot published on ``--stats-publish-endpoint``; the rest of
the message is a :class:`~lmkv_mp.wire.protocol.StatsReply` (req_id 0) as ``encode_reply``
writes it, so subscribers decode it with ``decode_reply(Op.STATS, frames[1:])``."""


def op_label(frames: list[bytes]) -> str:
    """The ``op`` label of a request: its op byte's name, whether or not the rest decodes."""
    return _OP_BY_FRAME.get(frames[0], "INVALID") if frames else "INVALID"


class LatencyHistogram:
    """Seconds one op's requests took, in :data:`LATENCY_BUCKETS`: ``counts[i]`` counts
    times in ``(LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]]``, the last count those above the
    last bound. A bisect and an add per request, on the loop without a lock (a
    prometheus_client Histogram takes a lock and loops over its buckets in Python)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass(slots=True)
class SidecarCounters:
    """Monotonic counts since the sidecar started (one writer: the control loop)."""

    started_at: float = field(default_factory=time.time)
    lookups: int = 0
    lookup_chunks: int = 0
    hit_chunks: int = 0
    stores: int = 0          # chunks committed
    stored_bytes: int = 0
    loads: int = 0           # chunks handed to readers by a pinned LOOKUP
    loaded_bytes: int = 0
    requests: Counter[str] = field(default_factory=Counter)   # "OP:ok" / "OP:error"
    errors: Counter[str] = field(default_factory=Counter)     # error code name
    ns_hits: Counter[bytes] = field(default_factory=Counter)  # namespace -> hit chunks
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)  # op name -> time serving it

    def observe(self, op: str, seconds: float) -> None:
        """Record that serving one ``op`` request took ``seconds`` (decode to encoded reply)."""
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = LatencyHistogram()
        h.observe(seconds)


def host_tier(counters: SidecarCounters, index: ChunkIndex) -> dict[str, Any]:
    """The host tier's entry in ``snapshot["tiers"]`` (every key of :data:`TIER_KEYS`)."""
    alloc = index.pool.alloc_state
    ic = index.counters
    return {
        "used_bytes": alloc.used_bytes,
        "capacity_bytes": alloc.capacity_bytes,
        "entries": len(index),
        "entries_by_state": index.entries_by_state(),
        "entry_slot_bytes": index.entry_slot_bytes(),
        "free_slabs": alloc.free_slabs(),
        "hit_chunks": counters.hit_chunks,
        "stored_chunks": counters.stores,
        "stored_bytes": counters.stored_bytes,
        "loaded_chunks": counters.loads,
        "loaded_bytes": counters.loaded_bytes,
        "evictions": ic.evictions,
        "evicted_bytes": ic.evicted_bytes,
        "prefetches": 0,
    }


def snapshot(boot_id: bytes, counters: SidecarCounters, index: ChunkIndex, clients: Iterable[ClientState],
             ns_names: dict[bytes, str], *, info: dict[str, Any] | None = None, host_pool_linked: bool = True,
             lower: TierHierarchy | None = None, gpu: GpuTier | None = None) -> dict[str, Any]:
    """The stats map (msgpack- and JSON-able; a new object each call). ``snapshot["tiers"]``
    holds ``host``, then the ``lower`` tiers' and the ``gpu`` tier's regions, each with the
    keys of :data:`TIER_KEYS`; ``clients`` are counted by role. ``info``: extra top-level
    keys (endpoints). Namespaces are listed in the order the sidecar learned their names
    (HELLO order), then unnamed ones (restored from a warm restart) by id. Costs one pass
    over the index.
    """
    now = time.time()
    ic = index.counters
    snap = {
        "version": __version__,
        "boot_id": boot_id.hex(),
        "boot_time": counters.started_at,
        "time": now,
        "uptime_s": round(now - counters.started_at, 3),
        **(info or {}),
        "clients": dict(Counter(c.role.value for c in clients)),
        "tiers": {"host": host_tier(counters, index), **(lower.stats() if lower is not None else {}),
                  **(gpu.stats() if gpu is not None else {})},
        "leases": index.leases_by_kind(),
        "lookups": counters.lookups,
        "lookup_chunks": counters.lookup_chunks,
        "hit_chunks": counters.hit_chunks,
        "stores": counters.stores,
        "stored_bytes": counters.stored_bytes,
        "loads": counters.loads,
        "loaded_bytes": counters.loaded_bytes,
        "evictions": ic.evictions,
        "evicted_bytes": ic.evicted_bytes,
        "aborted_writes": ic.aborted,
        "errors": sum(counters.errors.values()),
        "errors_by_code": dict(counters.errors),
        "requests": dict(counters.requests),
        "request_seconds": {
            "buckets": list(LATENCY_BUCKETS),
            "ops": {op: {"counts": list(h.counts), "sum": h.total} for op, h in counters.latency.items()},
        },
        "namespaces": _namespaces(counters, index, ns_names),
        "evicted_dirty": ic.evicted_dirty,
        "corrupt_chunks": ic.corrupt,
        "quota_refused_chunks": ic.quota_refused,
        "host_pool_linked": host_pool_linked,
        "parked_slots": index.parked_slots(),
    }
    if lower is not None:
        snap["tier_movers"] = lower.activity()
    return snap


def _namespaces(counters: SidecarCounters, index: ChunkIndex, ns_names: dict[bytes, str]) -> list[dict[str, Any]]:
    """``snapshot["namespaces"]``: every namespace named, holding entries or hit."""
    by_ns = index.bytes_by_namespace()
    order = list(ns_names) + sorted((set(by_ns) | set(counters.ns_hits)) - set(ns_names))
    out = []
    for ns in order:
        entries, nbytes = by_ns.get(ns, (0, 0))
        hits = counters.ns_hits.get(ns, 0)
        if entries or hits or ns in ns_names:
            out.append({"id": ns.hex(), "name": ns_names.get(ns, ns.hex()[:12]),
                        "entries": entries, "bytes": nbytes, "hit_chunks": hits})
    return out


def quantile(hist: dict[str, Any], buckets: list[float], q: float) -> float | None:
    """The upper bound of the bucket that holds quantile ``q`` of one op's entry in
    ``snapshot["request_seconds"]["ops"]`` (inf above the last bound; None: no requests)."""
    total = sum(hist["counts"])
    if not total:
        return None
    rank = q * total
    for bound, cum in zip([*buckets, float("inf")], itertools.accumulate(hist["counts"])):
        if cum >= rank:
            return bound
    return float("inf")


class SnapshotBroker:
    """Hands snapshots from the control loop to reader threads.

    A reader calls :meth:`fresh`: it registers, wakes the loop and waits. The loop checks
    :attr:`wanted` once per iteration and, if set, builds one snapshot and :meth:`put` s it,
    which releases every waiting reader. Because the loop serves nothing while it builds,
    a reader gets a snapshot that includes every request answered before it asked.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._latest: dict[str, Any] | None = None
        self._waiting: list[threading.Event] = []
        # Read by the loop without the lock: a stale False only defers the answer to the
        # next iteration, and the reader's wake-up guarantees there is one.
        self.wanted = False

    def latest(self) -> dict[str, Any] | None:
        return self._latest

    def put(self, snap: dict[str, Any]) -> None:
        """Loop side: publish ``snap`` (never to be changed again) and release readers."""
        with self._lock:
            self._latest = snap
            waiting, self._waiting = self._waiting, []
            self.wanted = False
        for ev in waiting:
            ev.set()

    def fresh(self, timeout: float) -> dict[str, Any] | None:
        """Reader side: a snapshot built after this call, or, if the loop does not answer
        within ``timeout``, the latest one (None before the first)."""
        ev = threading.Event()
        with self._lock:
            self._waiting.append(ev)
            self.wanted = True
        self._wake()
        ev.wait(timeout)
        return self._latest


class NamespaceLabels:
    """Bounded ``model`` label values of the per-namespace series: the first ``limit`` namespaces seen get their
    readable name (with a short id if two share a name), for as long as the process runs,
    so their counters stay monotonic; every later one is summed into ``other``."""

    OTHER = "other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._labels: dict[str, str] = {}

    def label(self, ns: dict[str, Any]) -> str:
        with self._lock:
            got = self._labels.get(ns["id"])
            if got is None:
                if len(self._labels) >= self.limit:
                    return self.OTHER
                taken = set(self._labels.values())
                got = ns["name"] if ns["name"] not in taken and ns["name"] != self.OTHER else f"{ns['name']}#{ns['id'][:8]}"
                self._labels[ns["id"]] = got
            return got


def prometheus_families(snap: dict[str, Any], ns_labels: NamespaceLabels | None = None,
                        age: float = 0.0) -> list[Metric]:
    """The Prometheus metric families of one snapshot (ARCHITECTURE §9, README table)."""
    return [*_request_families(snap), *_tier_families(snap["tiers"]), *_client_families(snap),
            *_namespace_families(snap["namespaces"], ns_labels), *_process_families(snap, age)]


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _request_families(snap: dict[str, Any]) -> list[Metric]:
    """Requests by op and outcome, the loop's time per op, chunks asked for."""
    requests = _counter("lmkv_requests", "Requests served, by op and outcome (ok or error reply).", ["op", "status"])
    for op in OP_NAMES:
        for status in ("ok", "error"):
            requests.add_metric([op, status], snap["requests"].get(f"{op}:{status}", 0))
    rs = snap["request_seconds"]
    bounds = [floatToGoString(b) for b in rs["buckets"]] + ["+Inf"]
    hist = HistogramMetricFamily("lmkv_request_seconds", "Time the sidecar's loop spent serving a request "
                                 "(decode to encoded reply), by op.", labels=["op"])
    for op in OP_NAMES:
        h = rs["ops"].get(op) or {"counts": [0] * len(bounds), "sum": 0.0}
        hist.add_metric([op], list(zip(bounds, itertools.accumulate(h["counts"]))), h["sum"])
    lookup_chunks = _counter("lmkv_lookup_chunks", "Chunks asked for by LOOKUP requests.")
    lookup_chunks.add_metric([], snap["lookup_chunks"])
    return [requests, hist, lookup_chunks]


_PER_TIER = (
    (_counter, "lmkv_hit_chunks", "Chunks LOOKUP found (leading hits), by the tier that held them.", "hit_chunks"),
    (_counter, "lmkv_stored_chunks", "Chunks written into a tier.", "stored_chunks"),
    (_counter, "lmkv_stored_bytes", "Bytes written into a tier.", "stored_bytes"),
    (_counter, "lmkv_loaded_chunks", "Chunks handed to readers (pinned LOOKUP) from a tier.", "loaded_chunks"),
    (_counter, "lmkv_loaded_bytes", "Bytes handed to readers (pinned LOOKUP) from a tier.", "loaded_bytes"),
    (_counter, "lmkv_evictions", "Entries evicted from a tier to make room.", "evictions"),
    (_counter, "lmkv_evicted_bytes", "Bytes evicted from a tier.", "evicted_bytes"),
    (_counter, "lmkv_prefetches", "Chunks prefetched into a tier from a lower one.", "prefetches"),
    (_counter, "lmkv_tier_errors", "Failed operations of a tier (I/O, remote store); each is a miss.", "errors"),
    (_counter, "lmkv_tier_corrupt", "Records a tier returned that failed verification (dropped, a miss).",
     "corrupt"),
    (_gauge, "lmkv_tier_used_bytes", "Bytes of a tier in use.", "used_bytes"),
    (_gauge, "lmkv_tier_capacity_bytes", "Bytes a tier can hold.", "capacity_bytes"),
)
"""The ``tier``-labelled families: (kind, name, help, the TIER_KEYS key they read)."""


def _tier_families(tiers: dict[str, dict[str, Any]]) -> list[Metric]:
    """One series per tier of every :data:`_PER_TIER` family, and entries by tier and state."""
    out: list[Metric] = []
    for make, name, doc, key in _PER_TIER:
        fam = make(name, doc, ["tier"])
        for tier, t in tiers.items():
            fam.add_metric([tier], t.get(key) or 0)
        out.append(fam)
    entries = _gauge("lmkv_entries", "Entries in a tier, by state.", ["tier", "state"])
    for tier, t in tiers.items():
        for state, n in (t.get("entries_by_state") or {"committed": t.get("entries") or 0}).items():
            entries.add_metric([tier, state], n)
    out.append(entries)
    return out


def _client_families(snap: dict[str, Any]) -> list[Metric]:
    """What clients hold and get: leases by kind, clients by role, errors by code, writes
    aborted."""
    leases = _gauge("lmkv_leases", "Leases held by clients, by kind.", ["kind"])
    for kind, n in snap["leases"].items():
        leases.add_metric([kind], n)
    clients = _gauge("lmkv_clients", "Registered clients, by role.", ["role"])
    roles = Counter({r: 0 for r in (*CLIENT_ROLES, "other")})
    for role, n in snap["clients"].items():
        roles[role if role in CLIENT_ROLES else "other"] += n
    for role, n in roles.items():
        clients.add_metric([role], n)
    errors = _counter("lmkv_errors", "Error replies, by error code.", ["code"])
    for code in ErrorCode:
        errors.add_metric([code.name], snap["errors_by_code"].get(code.name, 0))
    aborted = _counter("lmkv_aborted_writes", "Reserved chunks freed without a commit (writer gave up or died).")
    aborted.add_metric([], snap["aborted_writes"])
    return [leases, clients, errors, aborted]


def _namespace_families(namespaces: list[dict[str, Any]], ns_labels: NamespaceLabels | None) -> list[Metric]:
    """Hits, entries and bytes per namespace under bounded ``model`` labels (none when
    ``ns_labels`` is None or allows none)."""
    if ns_labels is None or not ns_labels.limit:
        return []
    ns_hits: Counter[str] = Counter()
    ns_entries: Counter[str] = Counter()
    ns_bytes: Counter[str] = Counter()
    for ns in namespaces:
        label = ns_labels.label(ns)
        ns_hits[label] += ns["hit_chunks"]
        ns_entries[label] += ns["entries"]
        ns_bytes[label] += ns["bytes"]
    ns_hits.setdefault(NamespaceLabels.OTHER, 0)
    # The label is "model", not "namespace": Kubernetes scrape configs put the pod's
    # namespace in a "namespace" label, which would rename this one.
    fams = [_counter("lmkv_namespace_hit_chunks", "Chunk hits per cache namespace, labelled with its "
                     "readable name model[dtype,tp shard]; see --metrics-namespaces.", ["model"]),
            _gauge("lmkv_namespace_entries", "Committed entries per cache namespace.", ["model"]),
            _gauge("lmkv_namespace_bytes", "Committed bytes per cache namespace.", ["model"])]
    for label in ns_hits:
        for fam, values in zip(fams, (ns_hits, ns_entries, ns_bytes)):
            fam.add_metric([label], values.get(label, 0))
    return fams


def _process_families(snap: dict[str, Any], age: float) -> list[Metric]:
    """Which sidecar process and version these series come from, and how fresh they are."""
    boot = _gauge("lmkv_boot_timestamp_seconds", "When this sidecar process started (Unix time); boot_id names it.",
                  ["boot_id"])
    boot.add_metric([snap["boot_id"]], snap["boot_time"])
    build = _gauge("lmkv_build_info", "lmkv_mp version of the sidecar.", ["version"])
    build.add_metric([snap["version"]], 1)
    fresh = _gauge("lmkv_snapshot_age_seconds", "Age of the snapshot these series come from (above a few "
                   "seconds: the control loop is stuck).")
    fresh.add_metric([], age)
    return [boot, build, fresh]


class SnapshotCollector:
    """A prometheus_client collector: each scrape asks the loop for a fresh snapshot."""

    def __init__(self, broker: SnapshotBroker, ns_labels: NamespaceLabels, timeout: float = 2.0) -> None:
        self.broker = broker
        self.ns_labels = ns_labels
        self.timeout = timeout

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration; names are fixed, nothing to collide with

    def collect(self) -> Iterator[Metric]:
        snap = self.broker.fresh(self.timeout)
        if snap is not None:
            yield from prometheus_families(snap, self.ns_labels, max(0.0, time.time() - snap["time"]))


class MetricsServer:
    """The Prometheus endpoint: ``http://host:port/metrics`` served by prometheus_client's
    WSGI server on daemon threads that read snapshots only (through the broker)."""

    def __init__(self, host: str, port: int, broker: SnapshotBroker, max_namespaces: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(broker, NamespaceLabels(max_namespaces)))
        ProcessCollector(registry=self.registry)  # process_* (CPU, RSS, fds) of the sidecar
        self._httpd, self._thread = start_http_server(port, host, self.registry)  # OSError if taken
        bracket = f"[{host}]" if ":" in host else host
        self.url = f"http://{bracket}:{port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
