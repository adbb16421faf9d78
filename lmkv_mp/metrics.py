"""Counters the sidecar keeps, and the stats snapshot built from them (ARCHITECTURE §9).

The control loop bumps plain integers in :class:`SidecarCounters` (no locks: one thread
writes them). :func:`snapshot` turns them and the index's state into the msgpack-able
map served on the stats socket and printed by ``lmkv-stats``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lmkv_mp.index import ChunkIndex


@dataclass(slots=True)
class SidecarCounters:
    started_at: float = field(default_factory=time.time)
    lookups: int = 0
    lookup_chunks: int = 0
    hit_chunks: int = 0
    stores: int = 0          # chunks committed
    stored_bytes: int = 0
    loads: int = 0           # chunks handed to readers by a pinned LOOKUP
    loaded_bytes: int = 0
    requests: Counter[str] = field(default_factory=Counter)   # "OP:status"
    errors: Counter[str] = field(default_factory=Counter)     # error code name
    ns_hits: Counter[bytes] = field(default_factory=Counter)  # namespace -> hit chunks


def snapshot(boot_id: bytes, counters: SidecarCounters, index: ChunkIndex,
             clients: dict[str, int], ns_names: dict[bytes, str]) -> dict[str, Any]:
    """The stats map. Keys are stable; tools may rely on them."""
    pool = index.pool
    by_ns = index.bytes_by_namespace()
    namespaces = []
    for ns in sorted(set(by_ns) | set(counters.ns_hits)):
        entries, nbytes = by_ns.get(ns, (0, 0))
        namespaces.append({"id": ns.hex(), "name": ns_names.get(ns, ns.hex()[:12]),
                           "entries": entries, "bytes": nbytes, "hit_chunks": counters.ns_hits.get(ns, 0)})
    ic = index.counters
    return {
        "boot_id": boot_id.hex(),
        "uptime_s": round(time.time() - counters.started_at, 3),
        "clients": dict(clients),
        "tiers": {
            "host": {
                "used_bytes": pool.alloc_state.used_bytes,
                "capacity_bytes": pool.alloc_state.capacity_bytes,
                "entries": len(index),
                "entries_by_state": index.entries_by_state(),
                "free_slabs": pool.alloc_state.free_slabs(),
            },
        },
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
        "namespaces": namespaces,
    }
