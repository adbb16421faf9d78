"""TierHierarchy: the sidecar's policy for moving chunks between the host tier and the
lower tiers (disk, remote). Runs on the control loop; the copies run on mover threads.

* **Prefetch.** A LOOKUP whose leading host hits stop short asks :meth:`prefetch` about the
  chunks that follow. A chunk a local tier holds (disk: an in-memory index) gets a WRITING
  host slot and a promotion job at once; a chunk only the remote tier may hold is first
  probed (one pipelined EXISTS for the whole tail, off the loop), and the probe's answer
  starts the promotions. The LOOKUP reports these chunks as ``pending``; clients ask again
  until they arrive or their prefetch deadline passes, then treat the rest as misses.
* **Write-through** copies every newly committed chunk to every lower tier. **Write-back**
  copies the coldest chunks that no lower tier holds once the host tier is fuller than
  :data:`WRITEBACK_HIGH`, and eviction prefers chunks that already have a lower copy, so
  the chunks evicted are mostly ones a lower tier can bring back.
* Nothing here can serve wrong bytes: a promoted entry becomes visible only after its tier
  verified the record's key, length and checksum; a failed or partial promotion is freed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

from lmkv_mp.sidecar.index.entry import Entry
from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.sidecar.tiers.base import Tier
from lmkv_mp.sidecar.tiers.mover import Job, JobKind, Movers
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import HASH_BYTES

log = logging.getLogger("lmkv.tiers")

PREFETCH_MAX_CHUNKS = 256   # chunks past the host hits one LOOKUP may start fetching
MAX_IN_FLIGHT = 512         # mover jobs at once; past this, prefetches are misses and copies wait
PROBE_TTL = 2.0             # seconds a remote presence answer is trusted
SEEN_MAX = 200_000          # remembered remote presence answers (oldest dropped first)
WRITEBACK_HIGH = 0.85       # write-back starts copying cold chunks above this host fill
WRITEBACK_BATCH = 32        # demotions queued per write-back pass
MOVER_THREADS = 2


class TierHierarchy:
    """Owned by the sidecar's loop thread; see the module docstring for the policies."""

    def __init__(self, index: ChunkIndex, view: memoryview, tiers: list[Tier], write_policy: str,
                 wake: Callable[[], None], threads: int = MOVER_THREADS) -> None:
        self.index = index
        self.tiers = tiers
        self.local = [t for t in tiers if t.local_index]
        self.remote = [t for t in tiers if not t.local_index]
        self.write_policy = write_policy
        self.movers = Movers(view, threads, wake)
        self.verify = index.checksum_at is not None   # --verify on: checksums travel with copies
        self.corrupt_found = 0                         # host entries that failed their checksum on demotion
        index.prefer_clean = True
        self._promoting: dict[bytes, Job] = {}
        self._demoting: set[bytes] = set()
        self._probing: set[bytes] = set()
        self._deleting: set[bytes] = set()             # CLEARed, files not yet gone: never sources
        self._seen: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self.prefetches: Counter[str] = Counter()      # tier -> promotions started from it
        self.promoted: Counter[str] = Counter()        # tier -> chunks brought into the host tier
        self.promoted_bytes: Counter[str] = Counter()
        self.demoted: Counter[str] = Counter()         # tier -> chunks copied down
        self.demoted_bytes: Counter[str] = Counter()
        self.promote_misses = 0
        self.dropped_copies = 0                        # copies skipped: movers saturated
        self._closed = False

    # -- prefetch -----------------------------------------------------------------------------

    def prefetch(self, namespaces: list[bytes], keys: tuple[bytes, ...], start: int) -> int:
        """Start bringing chunks ``start..`` of every namespace into the host tier; returns
        how many of them, contiguously from ``start``, may still arrive (``pending``)."""
        if self._closed:
            return 0
        now = time.monotonic()
        end = min(len(keys), start + PREFETCH_MAX_CHUNKS)
        for i in range(start, end):
            for ns in namespaces:
                state = self._fetch(ns + keys[i], now)
                if state == "miss":
                    return i - start
                if state == "unknown":
                    # Until the probe answers, any of the rest may come: report them all.
                    return end - start if self._probe(namespaces, keys, i, end, now) else i - start
        return end - start

    def _fetch(self, key: bytes, now: float) -> str:
        """One key: "ready" (in host or on its way), "unknown" (needs a remote probe), "miss"."""
        if key in self._promoting or self.index.is_visible(key):
            return "ready"
        sources = [t for t in self.local if key not in self._deleting and t.contains(key)]
        if self.remote:
            seen = self._seen.get(key)
            if seen is not None and seen[1] > now:
                if seen[0]:
                    sources.extend(self.remote)
            elif not sources:
                return "unknown"
            else:
                sources.extend(self.remote)  # a fallback if the local record turns out corrupt
        if not sources or self.movers.in_flight >= MAX_IN_FLIGHT:
            return "miss"
        e = self.index.reserve_internal(key)
        if e is None:  # a client is writing it, or the host tier has no room
            log.debug("tiers: cannot promote %s: its namespace is undeclared, a client is writing it, "
                      "or the host tier has no room", key.hex())
            return "miss"
        job = Job(JobKind.PROMOTE, tuple(sources), key, e.offset, e.length, token=e, verify=self.verify)
        self.prefetches[sources[0].name] += 1
        self._promoting[key] = job
        self.movers.submit(job)
        return "ready"

    def _probe(self, namespaces: list[bytes], keys: tuple[bytes, ...], i: int, end: int, now: float) -> bool:
        """Ask the remote tier about chunks ``i..end`` (those no probe is asking about yet).
        False when chunk ``i`` stays unknown (the movers are saturated): a miss, not a wait."""
        todo = []
        for j in range(i, end):
            for ns in namespaces:
                key = ns + keys[j]
                if key in self._probing or key in self._promoting or self.index.is_visible(key):
                    continue
                seen = self._seen.get(key)
                if seen is None or seen[1] <= now:
                    todo.append(key)
        if not todo:
            return True
        if self.movers.in_flight >= MAX_IN_FLIGHT:
            return all(ns + keys[i] in self._probing for ns in namespaces)
        self._probing.update(todo)
        self.movers.submit(Job(JobKind.PROBE, tuple(self.remote), keys=todo, token=(list(namespaces), keys, i)))
        return True

    # -- copies down --------------------------------------------------------------------------

    def committed(self, entries: list[Entry]) -> None:
        """Chunks a client just committed: write-through copies them down now."""
        if self.write_policy == "write-through":
            for e in entries:
                self._demote(e)
        else:
            self.tick()

    def tick(self) -> None:
        """Write-back: copy cold chunks down while the host tier is fuller than the mark."""
        if self.write_policy != "write-back":
            return
        alloc = self.index.pool.alloc_state
        if alloc.used_bytes <= WRITEBACK_HIGH * alloc.capacity_bytes or len(self._demoting) >= WRITEBACK_BATCH:
            return
        for e in self.index.cold_dirty(WRITEBACK_BATCH - len(self._demoting)):
            self._demote(e)

    def _demote(self, e: Entry) -> None:
        if e.key in self._demoting:
            return
        if self.movers.in_flight >= MAX_IN_FLIGHT:
            self.dropped_copies += 1
            return
        held = self.index.hold(e.key)
        if held is None:
            return
        self._demoting.add(e.key)
        self.movers.submit(Job(JobKind.DEMOTE, tuple(self.tiers), e.key, held.offset, held.length, token=held,
                               verify=self.verify, expect=held.checksum))

    def clear(self, namespace: bytes | None) -> int:
        """CLEAR reaches the node's own lower tiers (disk), never the remote one, which other
        nodes share. The deletions run on a mover; returns how many were queued."""
        n = 0
        for t in self.local:
            keys = t.keys(namespace) if hasattr(t, "keys") else []
            if keys:
                self.movers.submit(Job(JobKind.DELETE, (t,), keys=keys))
                self._deleting.update(keys)
                n += len(keys)
        self._seen.clear()
        return n

    # -- results --------------------------------------------------------------------------------

    def collect(self) -> int:
        """Apply finished jobs (loop thread). Returns how many."""
        done = self.movers.completed()
        now = time.monotonic()
        for job in done:
            if job.kind is JobKind.PROMOTE:
                del self._promoting[job.key]
                self.index.finish_internal(job.token, job.ok, job.digest if self.verify else None)
                if job.ok:
                    self.promoted[job.served_by] += 1
                    self.promoted_bytes[job.served_by] += job.length
                else:
                    log.debug("tiers: promotion of %s found nothing valid", job.key.hex())
                    self.promote_misses += 1
                    self._remember(job.key, False, now)
            elif job.kind is JobKind.DEMOTE:
                self._demoting.discard(job.key)
                e: Entry = job.token
                if job.corrupt:
                    self.corrupt_found += 1
                    log.warning("error: chunk %s failed its checksum before a copy down: dropped", e.key.hex())
                    self.index.drop_corrupt(e.key[:HASH_BYTES], HashList(e.key[HASH_BYTES:]), [job.expect])
                elif job.ok:
                    e.in_lower = True
                    for name in job.stored_in:
                        self.demoted[name] += 1
                        self.demoted_bytes[name] += job.length
                self.index.unhold(e)
            elif job.kind is JobKind.DELETE:
                self._deleting.difference_update(job.keys)
            else:
                self._probing.difference_update(job.keys)
                log.debug("tiers: probe found %d of %d chunks", sum(job.present), len(job.keys))
                for key, has in zip(job.keys, job.present or [False] * len(job.keys)):
                    self._remember(key, has, now)
                namespaces, keys, start = job.token
                self.prefetch(namespaces, keys, start)
        return len(done)

    def _remember(self, key: bytes, present: bool, now: float) -> None:
        self._seen[key] = (present, now + PROBE_TTL)
        self._seen.move_to_end(key)
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    # -- stats / shutdown -----------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per lower tier, the keys the snapshot's ``tiers`` map carries (metrics.TIER_KEYS):
        ``stored_*`` were copied down into the tier, ``loaded_*``/``hit_chunks`` came back up
        from it into the host tier, ``prefetches`` are the promotions started from it."""
        out = {}
        for t in self.tiers:
            u = t.usage()
            c = t.counters.as_dict()
            out[t.name] = {
                "used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes, "entries": u.entries,
                "stored_bytes": self.demoted_bytes[t.name], "stored_chunks": self.demoted[t.name],
                "loaded_bytes": self.promoted_bytes[t.name], "loaded_chunks": self.promoted[t.name],
                "hit_chunks": self.promoted[t.name], "prefetches": self.prefetches[t.name], "evictions": c["evictions"],
                "corrupt": c["corrupt"], "errors": c["errors"], "misses": c["misses"],
            }
        return out

    def activity(self) -> dict[str, int]:
        return {"in_flight": self.movers.in_flight, "promoting": len(self._promoting),
                "demoting": len(self._demoting), "probing": len(self._probing),
                "promote_misses": self.promote_misses, "dropped_copies": self.dropped_copies,
                "corrupt_found": self.corrupt_found}

    def close(self) -> None:
        """Finish the running copies, free unfinished promotions, close the tiers."""
        self._closed = True
        self.movers.close()
        self.collect()
        for t in self.tiers:
            t.close()
