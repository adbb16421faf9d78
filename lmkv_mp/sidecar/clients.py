"""The clients a sidecar serves, and the write slots their reaped writers may still be filling.

A client is known by its routing id from its HELLO until it is silent for the lease timeout
and the server reaps it. A silent client whose process still lives may only be stopped
(SIGSTOP, a frozen cgroup, swap) in the middle of a copy into its write slots: those are
parked, not freed, until its stale COMMIT or RELEASE says it is done, its process is gone,
or ``PARK_MAX_SECONDS`` pass; freeing them at once would let another writer's chunk be
overwritten when it resumes. No sockets here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmkv_mp.sidecar.index.chunk_index import ChunkIndex
from lmkv_mp.wire.protocol import Role

# How long the write slots of a reaped client whose process lives stay parked.
PARK_MAX_SECONDS = 600.0


@dataclass(slots=True)
class ClientState:
    client_id: int
    role: Role
    pid: int
    name: str
    last_seen: float
    namespaces: set[bytes] = field(default_factory=set)
    gpu_region: int = 0      # the GPU tier region on this client's device (0: none)


class ParkedWrites:
    """The parked write leases of reaped clients, each with its writer's pid and since when.

    The index keeps the parked slots (:meth:`ChunkIndex.park_writes`); this decides when
    they go back to it (:meth:`ChunkIndex.unpark`)."""

    def __init__(self, index: ChunkIndex) -> None:
        self._index = index
        self._leases: dict[int, tuple[int, float]] = {}     # parked write lease -> (writer pid, since)

    def park(self, client: ClientState, now: float) -> int:
        """Park the write leases of a client being reaped that has unfinished chunks, if its
        process lives (a dead one's slots are freed with its other leases); how many."""
        parked = self._index.park_writes(client.client_id) if process_alive(client.pid) else []
        for lease_id in parked:
            self._leases[lease_id] = (client.pid, now)
        return len(parked)

    def expire(self, now: float) -> None:
        """Free the slots of parked leases whose writer is gone or that waited PARK_MAX_SECONDS."""
        for lease_id, (pid, since) in list(self._leases.items()):
            if not process_alive(pid) or now - since > PARK_MAX_SECONDS:
                self._unpark(lease_id)

    def done(self, lease_id: int, pid: int) -> None:
        """Process ``pid`` sent a stale COMMIT or RELEASE of ``lease_id``: if it parked that
        lease, it is done with the slots, so they are freed now."""
        parked = self._leases.get(lease_id)
        if parked is not None and parked[0] == pid:
            self._unpark(lease_id)

    def _unpark(self, lease_id: int) -> None:
        del self._leases[lease_id]
        self._index.unpark(lease_id)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (clients that write the host pool
    are local: it is shared memory)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
