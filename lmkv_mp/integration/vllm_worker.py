"""The worker half of the vLLM connector: copies between the paged KV cache and slots.

Each rank runs the jobs of the step plan on one background thread, in order:

* load: check the plan's sidecar boot id is still current (a restart ends the leases
  that protected the slots), scatter each chunk into the request's blocks; report the
  request in ``finished_recving``. Any failure reports the request's blocks in
  ``get_block_ids_with_load_errors`` first, so vLLM recomputes them.
* store: RESERVE, gather each writable chunk into its slot, COMMIT what was written.
  A failed store is a future miss, nothing more.

With ``--verify on`` (the sidecar says so in HELLO) a store sends each slot's checksum at
COMMIT, and a load hashes each slot *after* scattering it and compares with the checksum
the LOOKUP gave. After, not before: bytes that change between the check and the copy
would pass unseen, while bytes that change after the copy only cost a needless recompute.
A mismatch fails the load (recompute) and is reported to the sidecar, which drops the chunk.

The copies go through the rank's one :class:`~lmkv_mp.engine.copy_path.CopyPath`, chosen at
registration: on a GPU :class:`~lmkv_mp.engine.cuda_path.CudaHostPath` (a staging slot in
device memory and DMA to the pinned host pool, on a side stream that starts after the work
the engine had queued when the job was submitted); on a CPU
:class:`~lmkv_mp.engine.copy_path.CpuPath`, straight between the cache and the slot. A CUDA
rank tells the sidecar its device in HELLO; where the sidecar has a GPU tier region there,
stores also fill the GPU slots RESERVE hands out and loads read the chunks that have a copy
there device to device. A GPU slot the rank cannot fill is never committed: the store is
dropped and the rank stops asking for GPU slots.

Blocks a job reads stay valid until the job ends: vLLM keeps a running request's blocks,
``request_finished`` delays the free of requests with stores, and ``handle_preemptions``
waits for in-flight jobs before the engine reuses a preempted request's blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from lmkv_mp.engine.client import SidecarClient
from lmkv_mp.engine.copy_path import CopyPath, CpuPath, LoadChunk, StoreChunk
from lmkv_mp.engine.copy_threads import one_torch_thread_pool
from lmkv_mp.engine.cuda_path import CudaHostPath
from lmkv_mp.engine.paged import PagedKV, slot_checksum
from lmkv_mp.integration.plan import LoadJob, StepPlan, StoreJob
from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.protocol import NamespaceInfo

log = logging.getLogger("lmkv.vllm")


class WorkerSide:
    """One rank's copies. ``checksum`` hashes one slot; it is used only while the sidecar
    runs ``--verify on``. ``path`` copies between ``paged`` and the slots; without it the
    rank picks the one for the cache's device (:class:`CpuPath` with the client's
    ``copy_threads``, or :class:`CudaHostPath`). The rank closes its path. A disabled rank
    (``disabled`` says why) has none and copies nothing."""

    def __init__(self, client: SidecarClient, paged: PagedKV, tp_rank: int, expected_block_bytes: int | None,
                 checksum: Callable[[torch.Tensor], int] = slot_checksum, *, path: CopyPath | None = None) -> None:
        self.client = client
        self.paged = paged
        self.tp_rank = tp_rank
        self.checksum = checksum
        self.disabled = ""
        self.paused = ""                         # why copies wait for resume() (sleep mode), or ""
        self.path: CopyPath | None = None
        actual = paged.chunk_bytes(1)
        if expected_block_bytes is not None and actual != expected_block_bytes:
            self.disabled = (f"registered KV cache holds {actual} bytes per block, the KV spec says "
                             f"{expected_block_bytes}: unknown layout, lmkv disabled on this rank")
            if path is not None:
                path.close()
        elif path is not None:
            self.path = path
        elif paged.device.type == "cpu":
            self.path = CpuPath(paged, client.config.copy_threads)
        elif paged.device.type == "cuda":
            try:
                self.path = CudaHostPath(paged)
            except (RuntimeError, ValueError) as e:
                self.disabled = f"the GPU copy path could not start on {paged.device} ({e}): lmkv disabled on this rank"
        else:
            self.disabled = (f"the KV cache is on {paged.device}, a device lmkv cannot copy from (CPU and CUDA "
                             "only): lmkv disabled on this rank (the engine runs as without it)")
        if self.disabled:
            log.warning("lmkv: %s", self.disabled)
        elif self.path is not None and self.path.device_uuid:
            client.set_device(self.path.device_uuid)  # the sidecar gives GPU tier slots on this device
        # One torch thread for the copies: the engine's own threads own the cores, and a
        # multi-threaded copy then stalls waiting for a second core (measured: 5 ms copies
        # taking 0.1-1.6 s on a busy 2-core host). Set in that thread alone, not for the
        # engine's threads (one_torch_thread_pool).
        self._pool = one_torch_thread_pool(1, "lmkv-copy")
        self._lock = threading.Lock()
        self._inflight: list[Future[None]] = []
        self._saving: dict[str, int] = {}        # req id -> store jobs not yet done
        self._finished: set[str] = set()         # finished per vLLM, with stores planned
        self._recved: set[str] = set()
        self._load_errors: set[int] = set()
        self._declared: set[bytes] = set()
        # Cumulative; take_stats() reports the change since its last call to vLLM (vllm_stats.py).
        self.stats = {"load_jobs": 0, "load_chunks": 0, "load_failures": 0, "store_jobs": 0, "store_chunks": 0,
                      "store_skipped": 0, "store_failures": 0, "load_seconds": 0.0, "store_seconds": 0.0}
        self._job_seconds: dict[str, list[float]] = {"load_seconds": [], "store_seconds": []}
        self._stats_taken: dict[str, int] = {}

    # -- per step -------------------------------------------------------------------------

    def wait_for_inflight(self) -> None:
        """Block until every submitted job has finished (before blocks can be reused)."""
        with self._lock:
            pending, self._inflight = self._inflight, []
        for fut in pending:
            fut.result()

    def submit_loads(self, plan: StepPlan) -> None:
        for job in plan.loads:
            self._submit(self._load, plan, job)

    def submit_stores(self, plan: StepPlan) -> None:
        for job in plan.stores:
            with self._lock:
                self._saving[job.req_id] = self._saving.get(job.req_id, 0) + 1
            self._submit(self._store, plan, job)

    def _submit(self, fn: Callable, plan: StepPlan, job: LoadJob | StoreJob) -> None:
        # On a GPU the job starts after the work the engine has queued so far (cuda_path.py).
        after = self.path.engine_event() if self.path is not None else None
        fut = self._pool.submit(fn, plan, job, after)
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(fut)

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            self._finished |= {r for r in finished_req_ids if r in self._saving}
            sending = {r for r in self._finished if self._saving.get(r, 0) == 0}
            for r in sending:
                self._finished.discard(r)
                self._saving.pop(r, None)
            recving, self._recved = self._recved, set()
        return sending or None, recving or None

    def take_stats(self) -> dict[str, Any]:
        """What this rank did since the last call: counter increments and per-job seconds
        (the ``data`` of vllm_stats.LMKVConnectorStats; zero counters left out)."""
        with self._lock:
            now = {k: v for k, v in self.stats.items() if not k.endswith("_seconds")}
            times, self._job_seconds = self._job_seconds, {"load_seconds": [], "store_seconds": []}
        data: dict[str, Any] = {k: v - self._stats_taken.get(k, 0) for k, v in now.items()
                                if v != self._stats_taken.get(k, 0)}
        self._stats_taken = now
        data.update((k, v) for k, v in times.items() if v)
        return data

    def _count_job(self, kind: str, seconds: float) -> None:
        """A finished job, for stats; the caller holds ``self._lock``."""
        self.stats[f"{kind}_jobs"] += 1
        self.stats[f"{kind}_seconds"] += seconds
        self._job_seconds[f"{kind}_seconds"].append(seconds)

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    # -- jobs (background thread) ---------------------------------------------------------

    def _load(self, plan: StepPlan, job: LoadJob, after: Any = None) -> None:
        start = time.perf_counter()
        ok = False
        try:
            ok = self._try_load(plan, job, after)
        except Exception:  # a failed copy is a miss, never an engine error
            log.exception("lmkv: load for %s failed", job.req_id)
        seconds = time.perf_counter() - start
        with self._lock:  # stats first: the step that reports the load done reports them too
            if not ok:
                self._load_errors.update(job.block_ids)
                self.stats["load_failures"] += 1
            self._count_job("load", seconds)
            self._recved.add(job.req_id)

    def _try_load(self, plan: StepPlan, job: LoadJob, after: Any) -> bool:
        path = self.path
        if path is None or self.paused:  # disabled, or the cache is released
            return False
        host = self.client.host_tensor()  # connects first if this rank has not yet
        # A fresh boot id: a restart since the lookup ended the lease that protects the slots.
        if host is None or not self.client.ping():
            return False
        if self.client.boot_id != job.boot_id:
            log.debug("lmkv: sidecar restarted since lookup of %s: recomputing", job.req_id)  # per request
            return False
        self._drop_stale_regions()
        bpc = plan.blocks_per_chunk
        nbytes = self.paged.chunk_bytes(bpc)
        rank = self._rank_index(len(job.offsets))
        offsets = job.offsets[rank]
        sums = job.checksums[rank] if job.checksums else []
        gpu = self._gpu_slots(job.gpu_regions[rank] if job.gpu_regions else [],
                              job.gpu_offsets[rank] if job.gpu_offsets else [], range(len(offsets)), nbytes)
        chunks, pos = [], 0
        for i, off in enumerate(offsets):
            first = job.skip_blocks if i == 0 else 0
            chunks.append(LoadChunk(off, job.block_ids[pos:pos + bpc - first], first, bpc, gpu[i]))
            pos += bpc - first
        path.load(host, chunks, nbytes, after)
        for i, s in enumerate(sums):
            if self.checksum(host[offsets[i]:offsets[i] + nbytes]) != s:
                self._report_corrupt(plan, job, i, s)
                return False
        # The pins protected the slots only while their lease lived: a sidecar restart, or the
        # lease reaped while the scheduler was frozen, may have let eviction hand the slots to
        # a writer before the copy ended. Alive now means alive throughout (ids are not reused).
        alive = self.client.leases_alive([job.lease_id])
        if alive != b"\x01" or self.client.boot_id != job.boot_id:
            log.warning("lmkv: load of %s not confirmed (%s): recomputing", job.req_id,
                        "sidecar unreachable" if alive is None else "sidecar restarted" if alive == b"\x01"
                        else "its lease ended during the copy")
            return False
        with self._lock:
            self.stats["load_chunks"] += len(offsets)
        return pos == len(job.block_ids)

    def _drop_stale_regions(self) -> None:
        """Let go of GPU tier regions the sidecar no longer announces (it restarted): once
        per job, before it maps any, when no copy of an earlier job uses them."""
        hello = self.client.hello
        if self.path is not None and hello is not None:
            self.path.drop_stale_regions([r.uuid for r in hello.regions])

    def _gpu_slots(self, regions: list[int], offsets: list[int], chunks: Any, nbytes: int) -> list[Any]:
        """For each chunk index in ``chunks``: its GPU tier slot as a device tensor, where
        ``regions`` names a region on this rank's device that it can map, else None."""
        if not regions or self.path is None:
            return [None for _ in chunks]
        mapped: dict[int, Any] = {0: None}   # region id -> its tensor (None: not usable here)
        out = []
        for i in chunks:
            rid = regions[i]
            if rid not in mapped:
                info = self.client.gpu_region(rid)
                mapped[rid] = self.path.gpu_region(info) if info is not None else None
            region, off = mapped[rid], offsets[i]
            out.append(region[off:off + nbytes] if region is not None and off + nbytes <= region.numel() else None)
        return out

    def _rank_index(self, entries: int) -> int:
        """This rank's index in a list of ``entries`` per-rank entries (a plan's namespaces,
        a load's offsets): 0 where one entry serves all ranks (one rank, or MLA, whose ranks
        hold identical bytes under one namespace), else the rank's own."""
        return 0 if entries == 1 else self.tp_rank

    def _namespace(self, plan: StepPlan) -> bytes:
        return plan.namespaces[self._rank_index(len(plan.namespaces))]

    def _report_corrupt(self, plan: StepPlan, job: LoadJob, i: int, expected: int) -> None:
        ns = self._namespace(plan)
        hashes = HashList(job.hashes)
        dropped = self.client.report_corrupt(ns, hashes[i], [expected]) if i < len(hashes) else 0
        log.warning("lmkv: chunk %d of %s failed its checksum after the copy: recomputing (sidecar dropped %d)",
                    i, job.req_id, dropped)

    def _store(self, plan: StepPlan, job: StoreJob, after: Any = None) -> None:
        start = time.perf_counter()
        failed = False
        try:
            self._try_store(plan, job, after)
        except Exception:  # a failed store is a future miss, never an engine error
            failed = True
            log.exception("lmkv: store for %s failed", job.req_id)
        finally:
            with self._lock:
                self.stats["store_failures"] += failed
                self._count_job("store", time.perf_counter() - start)
                self._saving[job.req_id] = self._saving.get(job.req_id, 1) - 1

    def _try_store(self, plan: StepPlan, job: StoreJob, after: Any) -> None:
        path = self.path
        if path is None or self.paused:  # disabled, or the cache is released
            return
        ns = self._namespace(plan)
        bpc = plan.blocks_per_chunk
        nbytes = self.paged.chunk_bytes(bpc)
        if ns not in self._declared:
            name = plan.namespace_names[plan.namespaces.index(ns)]
            if not self.client.declare([NamespaceInfo(ns, nbytes, name)]):
                return
            self._declared.add(ns)
        res = self.client.reserve(ns, job.hashes)
        if res is None:
            return
        host = self.client.host_tensor()
        if host is None or res.boot_id != self.client.boot_id:
            self.client.release(res.lease_id)
            return
        self._drop_stale_regions()
        verify = self.client.verify  # as of the HELLO the RESERVE ran under
        writable = res.writable().tolist()
        gpu = self._gpu_slots(res.gpu_regions.tolist(), res.gpu_offsets.tolist(), writable, nbytes)
        if any(g is None for i, g in zip(writable, gpu) if len(res.gpu_regions) and res.gpu_regions[i]):
            # A GPU slot this rank cannot fill would be published holding garbage: store
            # nothing this time, and ask for host slots only from now on.
            self.client.release(res.lease_id)
            self.client.set_device(b"")
            return
        chunks = [StoreChunk(job.block_ids[i * bpc:(i + 1) * bpc], int(res.offsets[i]), g)
                  for i, g in zip(writable, gpu)]
        try:
            path.store(host, chunks, nbytes, after)
        except BaseException:
            # Nothing is committed; give the slots back now rather than when this client goes
            # (a write lease lives until released or its owner is reaped). No copy into them
            # is still in flight: a CopyPath's store ends its copies before it raises.
            self.client.release(res.lease_id)
            raise
        written = HashList.of(HashList(job.hashes)[i] for i in writable)
        sums = [self.checksum(host[off:off + nbytes]) for _, off, _ in chunks] if verify else []
        committed = self.client.commit(res.lease_id, written.bytes, sums or None) if written else 0
        with self._lock:
            self.stats["store_skipped"] += len(res.status) - len(written)
            self.stats["store_chunks"] += committed

    def pause(self, reason: str) -> None:
        """Copy nothing until :meth:`resume` (vLLM's sleep mode releases the KV cache memory):
        jobs in flight finish first; jobs submitted meanwhile fail their loads and store
        nothing, as on a disabled rank."""
        self.paused = reason
        self.wait_for_inflight()

    def resume(self) -> None:
        self.paused = ""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.path is not None:
            self.path.close()  # unpins the host pool before the client unmaps it
        self.client.close()


class DeclinedRank:
    """A rank that cannot read its KV cache (a layout it does not know). It copies nothing
    and answers each job the scheduler planned at once, so that no request waits for it:
    a load fails (vLLM recomputes its blocks), a store is done (nothing was stored)."""

    def __init__(self, reason: str) -> None:
        self.disabled = reason
        self._lock = threading.Lock()
        self._recved: set[str] = set()
        self._load_errors: set[int] = set()
        self._saving: set[str] = set()
        self._failures = 0

    def submit_loads(self, plan: StepPlan) -> None:
        with self._lock:
            for job in plan.loads:
                self._load_errors.update(job.block_ids)
                self._recved.add(job.req_id)
                self._failures += 1

    def submit_stores(self, plan: StepPlan) -> None:
        with self._lock:
            self._saving.update(job.req_id for job in plan.stores)

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            sending = self._saving & set(finished_req_ids)
            self._saving -= sending
            recving, self._recved = self._recved, set()
        return sending or None, recving or None

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> dict[str, Any]:
        with self._lock:
            failures, self._failures = self._failures, 0
        return {"load_jobs": failures, "load_failures": failures} if failures else {}

    def wait_for_inflight(self) -> None:
        return

    def pause(self, reason: str) -> None:
        return

    def resume(self) -> None:
        return

    def close(self) -> None:
        return
