"""Tier movers: threads that copy between host slots and lower tiers off the control loop.

The loop decides; movers only copy. The loop submits a :class:`Job` after making its slot
safe to touch (a demotion's entry is pinned, a promotion's entry is WRITING and invisible,
a probe touches no slot), a mover thread runs it, appends it to the done queue and wakes
the loop, which applies the result (unpin, commit or free, remember what a probe saw).
Movers never touch a socket or the index (STYLE rule 4).

Jobs are bounded by the tiers' own timeouts, so :meth:`Movers.close` can wait for the
running ones before the host region is unmapped (a thread writing into an unmapped slot
would crash the sidecar).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from lmkv_mp.sidecar.tiers.base import Tier
from lmkv_mp.wire.checksum import checksum

log = logging.getLogger("lmkv.tiers")


class JobKind(enum.Enum):
    DEMOTE = "demote"      # host slot -> every target tier
    PROMOTE = "promote"    # first source tier that has it -> host slot
    PROBE = "probe"        # which of ``keys`` the (remote) tier holds
    DELETE = "delete"      # drop ``keys`` from the tiers (CLEAR)


@dataclass(slots=True, eq=False)
class Job:
    kind: JobKind
    tiers: tuple[Tier, ...]
    key: bytes = b""
    offset: int = 0
    length: int = 0
    keys: list[bytes] = field(default_factory=list)    # PROBE, DELETE
    token: Any = None                                    # the loop's handle (Entry, lookup context)
    verify: bool = False     # --verify on: PROMOTE computes ``digest``; DEMOTE checks ``expect`` first
    expect: int = 0                                      # DEMOTE: the entry's checksum from COMMIT
    # results, written by the mover thread before the job is handed back
    ok: bool = False
    served_by: str = ""                                  # PROMOTE: the tier that had it
    stored_in: list[str] = field(default_factory=list)   # DEMOTE: tiers that took it
    present: list[bool] = field(default_factory=list)    # PROBE
    digest: int = 0                                      # PROMOTE with verify: checksum of the slot
    corrupt: bool = False                                # DEMOTE with verify: slot != its checksum


class Movers:
    """A small pool of threads over one host region view."""

    def __init__(self, view: memoryview, threads: int, wake: Callable[[], None]) -> None:
        self._view = view
        self._wake = wake
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: deque[Job] = deque()
        self.in_flight = 0          # submitted, not yet collected (the loop's own count)
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"lmkv-mover-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        self.in_flight += 1
        self._queue.put(job)

    def completed(self) -> list[Job]:
        """The jobs finished since the last call (loop thread only)."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.in_flight -= len(out)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stop the threads: queued jobs come back undone (``ok`` false), running ones
        finish (each is bounded by its tier's timeouts); wait up to ``timeout``."""
        self._stopping = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                log.warning("tiers: mover %s still busy at shutdown", t.name)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if not self._stopping:
                    self._do(job)
            except Exception:  # a tier bug must not kill the thread or lose the job's slot
                log.exception("tiers: %s job failed", job.kind.value)
                job.ok = False
            self._done.append(job)
            self._wake()

    def _do(self, job: Job) -> None:
        if job.kind is JobKind.PROBE:
            present = [False] * len(job.keys)
            for tier in job.tiers:
                for i, has in enumerate(tier.contains_many(job.keys)):
                    present[i] = present[i] or has
            job.present = present
            job.ok = True
            return
        if job.kind is JobKind.DELETE:
            for tier in job.tiers:
                for key in job.keys:
                    tier.delete(key)
            job.ok = True
            return
        slot = self._view[job.offset:job.offset + job.length]
        try:
            if job.kind is JobKind.PROMOTE:
                for tier in job.tiers:
                    if tier.get_into(job.key, slot):
                        job.ok, job.served_by = True, tier.name
                        if job.verify:  # hashed here, off the loop
                            job.digest = checksum(slot)
                        return
            else:
                if job.verify and checksum(slot) != job.expect:
                    job.corrupt = True  # changed in the host pool since COMMIT: copy it nowhere
                    return
                job.stored_in = [tier.name for tier in job.tiers if tier.put(job.key, slot)]
                job.ok = bool(job.stored_in)
        finally:
            slot.release()
