"""The connector's stats through vLLM's own hooks: each side reports what it did since the
last step exactly once, ranks sum, and vLLM's logger and Prometheus series show them.

The scheduler and worker halves run against a real sidecar (as in test_vllm_scheduler.py
and test_vllm_worker.py); the log line and the Prometheus series come from vLLM's
KVConnectorLogging and our KVConnectorPromMetrics, fed the dict vLLM would hand them.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmkv_mp.integration.plan import LoadJob, StoreJob
from lmkv_mp.integration.vllm import LMKVConnector
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.integration.vllm_stats import COUNTERS, LMKVConnectorStats, LMKVPromMetrics, make_stats
from lmkv_mp.wire.keys import chain_hashes
from tests.conftest import SidecarHandle
from tests.integration.test_vllm_scheduler import CHUNK as S_CHUNK
from tests.integration.test_vllm_scheduler import TOKENS, namespaces, request, store_chunks
from tests.integration.test_vllm_worker import BPC, CHUNK, cache, plan, worker


@pytest.fixture
def handle(sidecar: Callable[..., SidecarHandle]) -> SidecarHandle:
    return sidecar()


def test_worker_reports_each_job_once(handle: SidecarHandle) -> None:
    w = worker(handle, cache(1))
    key = handle.client("scheduler")
    assert key.connect()
    hashes = chain_hashes(list(range(3 * CHUNK)), CHUNK, key.hello.hash_key)
    assert w.take_stats() == {}
    w.submit_stores(plan(stores=[StoreJob("r1", hashes, list(range(3 * BPC)))]))
    w.wait_for_inflight()
    s = w.take_stats()
    assert {k: v for k, v in s.items() if k != "store_seconds"} == {"store_jobs": 1, "store_chunks": 3}
    assert len(s["store_seconds"]) == 1 and s["store_seconds"][0] > 0
    assert w.take_stats() == {}, "reported once"

    found = key.lookup([bytes(range(16))], hashes, pin=True)
    loads = [LoadJob("r2", found.boot_id, [found.offsets[0].tolist()], [], list(range(10, 10 + 3 * BPC)), 0,
                     lease_id=found.lease_id),
             LoadJob("r3", b"another-boot-id!", [[0]], [], [30, 31], 0)]
    w.submit_loads(plan(loads=loads))
    w.submit_stores(plan(stores=[StoreJob("r4", hashes, list(range(3 * BPC)))]))  # all present: skipped
    w.wait_for_inflight()
    s = w.take_stats()
    assert len(s.pop("load_seconds")) == 2 and len(s.pop("store_seconds")) == 1
    assert s == {"load_jobs": 2, "load_chunks": 3, "load_failures": 1, "store_jobs": 1, "store_skipped": 3}
    key.release(found.lease_id)


def test_scheduler_reports_lookups_hits_and_loaded_tokens(handle: SidecarHandle) -> None:
    s = SchedulerSide(handle.client("scheduler"), namespaces(), S_CHUNK, 32)
    store_chunks(handle, TOKENS, 3)
    assert s.take_stats() == {}
    req = request("r1", TOKENS)
    assert s.get_num_new_matched_tokens(req, S_CHUNK) == (2 * S_CHUNK, True)  # one chunk already local
    s.update_state_after_alloc(req, list(range(10)), 2 * S_CHUNK)
    assert s.get_num_new_matched_tokens(request("r2", TOKENS[:S_CHUNK + 1]), 0) == (S_CHUNK, True)
    # TOKENS has 5 chunks, 4 may be claimed (never the last token); r2 has 1.
    assert s.take_stats() == {"lookups": 2, "lookup_tokens": 5 * S_CHUNK, "hit_tokens": 4 * S_CHUNK,
                              "loaded_tokens": 2 * S_CHUNK}
    assert s.take_stats() == {}


def test_stats_sum_over_ranks_and_reach_vllms_log_and_prometheus() -> None:
    rank0 = make_stats({"load_jobs": 1, "load_chunks": 4, "load_seconds": [0.002]})
    rank1 = make_stats({"load_jobs": 1, "load_chunks": 4, "load_seconds": [0.004], "store_failures": 1})
    sched = make_stats({"lookups": 1, "lookup_tokens": 512, "hit_tokens": 256, "loaded_tokens": 256})
    assert make_stats({}) is None, "an idle step reports nothing"
    assert rank0 is not None and rank1 is not None and sched is not None
    total = rank0.aggregate(rank1).aggregate(sched)
    assert total.data == {"load_jobs": 2, "load_chunks": 8, "load_seconds": [0.002, 0.004], "store_failures": 1,
                          "lookups": 1, "lookup_tokens": 512, "hit_tokens": 256, "loaded_tokens": 256}

    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    ktc = KVTransferConfig(kv_connector="LMKVConnector", kv_connector_module_path="lmkv_mp.integration.vllm",
                           kv_role="kv_both")
    logging_ = KVConnectorLogging(ktc)
    assert logging_.connector_cls is LMKVConnector
    logging_.observe(total.to_dict())
    logging_.observe({"lookups": 1, "lookup_tokens": 512, "hit_tokens": 512})
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    (line,) = lines
    assert line.startswith("KV Transfer metrics: lookups=2, hit_tokens=768, loaded_tokens=256, load_chunks=8, "
                           "load_failures=0, store_chunks=0, store_failures=1, hit_rate=0.75, avg_load_ms=3.0"), line

    registry = CollectorRegistry()
    types: dict[type, Any] = {t: functools.partial(t, registry=registry) for t in (Counter, Gauge, Histogram)}
    prom = LMKVPromMetrics(SimpleNamespace(kv_transfer_config=ktc), types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(total.to_dict(), 0)
    prom.observe({"hit_tokens": 512, "store_seconds": [0.5]}, 0)

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", "engine": "0"})
    assert sample("vllm:lmkv_hit_tokens_total") == 768 and sample("vllm:lmkv_loaded_tokens_total") == 256
    assert sample("vllm:lmkv_load_chunks_total") == 8 and sample("vllm:lmkv_store_failures_total") == 1
    assert sample("vllm:lmkv_load_seconds_count") == 2 and sample("vllm:lmkv_load_seconds_sum") == pytest.approx(0.006)
    assert sample("vllm:lmkv_store_seconds_count") == 1
    assert all(sample(f"vllm:lmkv_{k}_total") is not None for k in COUNTERS)
    assert isinstance(LMKVConnector.build_kv_connector_stats({"lookups": 1}), LMKVConnectorStats)
