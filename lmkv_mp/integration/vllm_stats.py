"""The connector's own statistics, reported through vLLM's connector-stats hooks (0.32).

Flow: every step, each worker's ``get_kv_connector_stats`` returns what its rank did since
the step before (:meth:`WorkerSide.take_stats`); vLLM sums the ranks' (``aggregate``), adds
the scheduler's (:meth:`SchedulerSide.take_stats`), and hands the sum's ``data`` to its
stat loggers: ``reduce`` makes the periodic "KV Transfer metrics: ..." log line, and
:class:`LMKVPromMetrics` adds the ``vllm:lmkv_*`` series to vLLM's own /metrics (labels
``model_name`` and ``engine``, as vLLM's other series).

``data`` is a flat map: counters (:data:`COUNTERS`, summed) and lists of per-job seconds
(:data:`JOB_SECONDS`, concatenated). Every key is optional; absent means 0. Worker counts
are summed over tensor-parallel ranks: each rank moves its own shard of every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics, KVConnectorStats,
                                                                  PromMetric, PromMetricT)

COUNTERS: dict[str, str] = {
    # scheduler
    "lookups": "Pinned LOOKUPs the scheduler sent to the lmkv sidecar.",
    "lookup_tokens": "Prompt tokens (whole chunks) those lookups asked about.",
    "hit_tokens": "Tokens the sidecar held for those lookups (leading chunks every rank has).",
    "loaded_tokens": "Tokens vLLM took from lmkv instead of computing them (tokens saved).",
    # workers
    "load_jobs": "Load jobs run (one per request and step), summed over ranks.",
    "load_chunks": "Chunks copied from the sidecar into the paged KV cache, summed over ranks.",
    "load_failures": "Load jobs that failed (those blocks were recomputed), summed over ranks.",
    "store_jobs": "Store jobs run, summed over ranks.",
    "store_chunks": "Chunks copied into the sidecar and committed, summed over ranks.",
    "store_skipped": "Chunks a store skipped (already present, being written, or no space).",
    "store_failures": "Store jobs that failed (a future miss, nothing more), summed over ranks.",
}
JOB_SECONDS: dict[str, str] = {
    "load_seconds": "Time of one load job on a rank (sidecar calls and copies).",
    "store_seconds": "Time of one store job on a rank (RESERVE, copies, COMMIT).",
}
JOB_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LMKVConnectorStats(KVConnectorStats):
    """See the module docstring for ``data``."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in
                                       ("lookups", "hit_tokens", "loaded_tokens", "load_chunks", "load_failures",
                                        "store_chunks", "store_failures")}
        if d.get("lookup_tokens"):
            out["hit_rate"] = round(d.get("hit_tokens", 0) / d["lookup_tokens"], 4)
        for key in JOB_SECONDS:
            times = d.get(key) or []
            if times:
                out[f"avg_{key[:-len('_seconds')]}_ms"] = round(1e3 * sum(times) / len(times), 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


def make_stats(data: dict[str, Any]) -> LMKVConnectorStats | None:
    """A stats object for vLLM, or None when nothing happened (vLLM skips empty stats)."""
    stats = LMKVConnectorStats(data=data)
    return None if stats.is_empty() else stats


class LMKVPromMetrics(KVConnectorPromMetrics):
    """``vllm:lmkv_<counter>_total`` for each of :data:`COUNTERS` and the histograms
    ``vllm:lmkv_load_seconds`` / ``vllm:lmkv_store_seconds`` (per job)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        self._hists: dict[str, dict[int, Any]] = {}
        for key, doc in COUNTERS.items():
            metric = self._counter_cls(name=f"vllm:lmkv_{key}", documentation=doc, labelnames=labelnames)
            self._counters[key] = {i: metric.labels(*v) for i, v in per_engine_labelvalues.items()}
        for key, doc in JOB_SECONDS.items():
            metric = self._histogram_cls(name=f"vllm:lmkv_{key}", documentation=doc, labelnames=labelnames,
                                         buckets=JOB_BUCKETS)
            self._hists[key] = {i: metric.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            value = transfer_stats_data.get(key)
            if value:
                per_engine[engine_idx].inc(value)
        for key, per_engine in self._hists.items():
            for seconds in transfer_stats_data.get(key) or ():
                per_engine[engine_idx].observe(seconds)
