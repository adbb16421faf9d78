"""Threads for the worker's CPU copies, each running torch on one thread.

The connector's job thread copies alone by default; ``lmkv.copy_threads`` N adds N-1
helpers that share each chunk's per-part copies (:class:`CopyThreads`, held by
``copy_path.CpuPath`` and used by ``paged.PagedKV``). Either way the threads must not change the thread count the
engine's own threads get (:func:`one_torch_thread_pool`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def one_torch_thread_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool whose threads each run torch on one thread, started now, leaving the process's
    default as it was.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size and also the
    process-wide default that every thread adopts at its first parallel op. So each pool
    thread sets 1 and runs one parallel op (adopting 1 for good), all at once (a barrier
    makes them distinct threads), and then the default goes back to what the engine set:
    threads the engine starts later keep its setting, not ours."""
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    started = threading.Barrier(workers, timeout=60)

    def one_thread() -> None:
        started.wait()
        torch.set_num_threads(1)
        torch.zeros(1 << 16).add_(1)  # a parallel op: this thread's setting is fixed from here on

    for f in [pool.submit(one_thread) for _ in range(workers)]:
        f.result()
    torch.set_num_threads(before)
    return pool


class CopyThreads:
    """``total`` threads for one copy: the caller's and ``total - 1`` helpers, each running
    torch on one thread (a copy split by us, not by OpenMP, keeps each thread on one
    contiguous stretch of parts). CPU copies only: a CUDA copy stays on its caller, whose
    stream the caller synchronises."""

    def __init__(self, total: int) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or not 1 <= total <= 64:
            raise ValueError(f"copy threads must be an int in 1..64, got {total!r}")
        self.total = total
        self._pool = one_torch_thread_pool(total - 1, "lmkv-copy-helper") if total > 1 else None

    def run(self, fn: Callable[[list], None], ops: list) -> None:
        """``fn(ops)``, split into up to ``total`` contiguous groups run at once. Returns when
        every group has finished, even after one failed or could not be handed out (so no
        copy outlives the call, and the caller can release its slots); then raises the
        first failure."""
        k = min(self.total, len(ops))
        if self._pool is None or k < 2:
            fn(ops)
            return
        bounds = [len(ops) * i // k for i in range(k + 1)]
        futures: list[Future[None]] = []
        first: BaseException | None = None
        try:
            for i in range(1, k):
                futures.append(self._pool.submit(fn, ops[bounds[i]:bounds[i + 1]]))
            fn(ops[:bounds[1]])
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the helpers finish
            first = e
        for f in futures:
            e = f.exception()
            if first is None and e is not None:
                first = e
        if first is not None:
            raise first

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
