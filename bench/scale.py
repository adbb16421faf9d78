"""Many worker processes against one sidecar: aggregate throughput, lookup latency, sidecar cost.

1, 2, 4, 8 concurrent worker processes (``--workers``), each with its own vLLM-CPU-layout
paged KV cache of bench/datapath.py's Llama-3-8B-like shard (32 MiB per 256-token chunk),
share one real sidecar. For each worker count, ``--rounds`` times:

* store phase: every active worker stores ``--prompts`` fresh prompts of ``--chunks``
  chunks (RESERVE -> gather -> COMMIT, datapath.py's ``store``), all released together;
* load phase: every active worker loads them back into other blocks (pinned LOOKUP ->
  scatter -> RELEASE, datapath.py's ``load``);

then a lookup phase: every active worker issues ``--lookup-iters`` LOOKUPs of a 32k-token
prompt (128 chunks, all present), as bench/lookup.py does with one client.

Aggregate GB/s = bytes moved by all workers / (last worker's end - first worker's start).
``sidecar_cpu_s_per_gb``: the sidecar's CPU seconds (all its threads, from /proc) during
the phase per GB moved; the copies are the workers', so this is the control plane's cost.
``sidecar_rss``: the sidecar's resident memory after the worker count's phases (the host
pool it pre-faults shows as ``rss_shmem``). The pool holds one round of the largest count;
older rounds are evicted as a full cache would (``evictions``). Workers are spawned once and
idle while not active. One JSON line per (workers, op):

    {"bench":"scale","workers":N,"op":"store"|"load","gbps":…,"sidecar_cpu_s_per_gb":…,…}
    {"bench":"scale","workers":N,"op":"lookup","p50_us":…,"p99_us":…,"lookups_per_s":…,…}
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, percentile, proc_cpu_seconds, proc_memory, sidecar  # noqa: E402
from datapath import (BLOCK_SIZE, BPC, CHUNK_TOKENS, HEAD_SIZE, KV_HEADS, LAYERS, SLAB,  # noqa: E402
                      Prompts, cpu_kv_cache, load, store)

from lmkv_mp.wire import protocol as P  # noqa: E402
from lmkv_mp.config import ClientConfig  # noqa: E402
from lmkv_mp.wire.keys import Namespace, chain_hashes  # noqa: E402

LOOKUP_NS = bytes(range(16))
LOOKUP_CHUNK_BYTES = 16384
TIMEOUT = 600


def schedule(counts: list[int], rounds: int) -> list[tuple[int, str]]:
    """The phases every process walks through in the same order: (active workers, phase)."""
    return [(n, phase) for n in counts for phase in [*(["store", "load"] * rounds), "lookup"]]


def worker(idx: int, cfg: ClientConfig, plan: list[tuple[int, str]], chunks: int, prompts: int,
           lookup_hashes: bytes, lookup_iters: int, barrier: Any, results: Any) -> None:
    """One worker process: walks ``plan``, active in the phases whose count exceeds ``idx``."""
    import torch

    from lmkv_mp.engine.client import SidecarClient
    from lmkv_mp.engine.paged import PagedKV
    try:
        torch.set_num_threads(1)  # as the connector's copy thread; the cores are shared by all workers
        num_blocks = 2 * chunks * BPC + BPC
        paged = PagedKV(cpu_kv_cache(num_blocks, seed=idx), num_blocks=num_blocks, block_dim=0)
        nbytes = paged.chunk_bytes(BPC)
        ns = Namespace("llama-3-8b-like", "bench", "bfloat16", LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE,
                       paged.layout_fingerprint(), CHUNK_TOKENS, 1, 0).id
        client = SidecarClient(cfg, role="worker", namespaces=[P.NamespaceInfo(ns, nbytes, "bench")])
        if not client.connect() or client.hello is None or client.host_tensor() is None:
            raise RuntimeError("HELLO failed or the host pool could not be mapped")
        gen = Prompts(chunks, num_blocks, client.hello.hash_key, seed=1000 + idx, consecutive=False)
        warm = gen.next()  # first calls pay imports and page faults; not timed
        store(client, paged, ns, warm[0], warm[1], nbytes)
        load(client, paged, ns, warm[0], warm[2], nbytes)
        pending: list[tuple[bytes, list[list[int]], list[list[int]]]] = []
        for n, phase in plan:
            barrier.wait(TIMEOUT)
            if idx >= n:
                continue
            lat: list[float] = []
            t0 = time.monotonic()
            if phase == "store":
                pending = [gen.next() for _ in range(prompts)]
                t0 = time.monotonic()
                for hashes, ids_from, _ in pending:
                    lat.append(store(client, paged, ns, hashes, ids_from, nbytes)[0])
            elif phase == "load":
                for hashes, _, ids_to in pending:
                    lat.append(load(client, paged, ns, hashes, ids_to, nbytes)[0])
            else:
                want = len(lookup_hashes) // 16
                for _ in range(lookup_iters):
                    s = time.perf_counter()
                    r = client.lookup([LOOKUP_NS], lookup_hashes)
                    lat.append(time.perf_counter() - s)
                    if r.hits != want:
                        raise RuntimeError(f"LOOKUP hit {r.hits} of {want}")
            results.put((idx, phase, t0, time.monotonic(), lat))
        client.close()
    except BaseException:
        results.put((idx, "error", 0.0, 0.0, traceback.format_exc()))
        barrier.abort()
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per prompt [4; quick 2]")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per worker per phase [2]")
    ap.add_argument("--rounds", type=int, default=None, help="store+load rounds per worker count [3; quick 1]")
    ap.add_argument("--lookup-iters", type=int, default=None, help="LOOKUPs per worker [500; quick 100]")
    ap.add_argument("--lookup-tokens", type=int, default=32768)
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under a minute)")
    args = ap.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    chunks = args.chunks or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 3)
    lookup_iters = args.lookup_iters or (100 if args.quick else 500)
    nbytes = CHUNK_TOKENS * LAYERS * KV_HEADS * 2 * HEAD_SIZE * 2
    # One round of the largest count (plus each worker's warm-up prompt) fits; the header, the
    # lookup prompt's slab and one spare slab on top.
    per_slab = max(1, SLAB // nbytes)
    slots = max(counts) * (args.prompts + 1) * chunks
    pool = f"{(-(-slots // per_slab) + 3) * SLAB >> 20}MiB"
    plan = schedule(counts, rounds)

    with sidecar(pool, f"{SLAB >> 20}MiB", "--chunk-tokens", str(CHUNK_TOKENS)) as sc:
        from lmkv_mp.engine.client import SidecarClient
        admin = SidecarClient(sc.client_config(), role="worker", heartbeat=False,
                              namespaces=[P.NamespaceInfo(LOOKUP_NS, LOOKUP_CHUNK_BYTES, "bench")])
        if not admin.connect() or admin.hello is None:
            raise RuntimeError("HELLO failed")
        lookup_hashes = chain_hashes(list(range(args.lookup_tokens)), CHUNK_TOKENS, admin.hello.hash_key)

        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(max(counts) + 1), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(i, sc.client_config(), plan, chunks, args.prompts, lookup_hashes,
                                                   lookup_iters, barrier, results), daemon=True)
                 for i in range(max(counts))]
        for p in procs:
            p.start()
        pid = sc.proc.pid
        acc: dict[tuple[int, str], dict[str, list[float]]] = {}
        try:
            for n, phase in plan:
                if phase == "lookup":
                    # The lookup prompt's small slots may have been evicted by the big ones: store them again.
                    res = admin.reserve(LOOKUP_NS, lookup_hashes)
                    if res is None or admin.commit(res.lease_id) + int((res.status == P.SlotStatus.PRESENT).sum()) \
                            != len(lookup_hashes) // 16:
                        raise RuntimeError("could not (re)store the lookup prompt")
                evictions0 = int(admin.stats()["evictions"])
                barrier.wait(TIMEOUT)
                cpu0 = proc_cpu_seconds(pid)
                got = []
                for _ in range(n):
                    rec = results.get(timeout=TIMEOUT)
                    if rec[1] == "error":
                        raise RuntimeError(f"worker {rec[0]} failed:\n{rec[4]}")
                    got.append(rec)
                cpu = proc_cpu_seconds(pid) - cpu0
                a = acc.setdefault((n, phase), {"wall": [], "cpu": [], "lat": [], "evictions": []})
                a["wall"].append(max(r[3] for r in got) - min(r[2] for r in got))
                a["cpu"].append(cpu)
                a["lat"].extend(x for r in got for x in r[4])
                a["evictions"].append(int(admin.stats()["evictions"]) - evictions0)
                if phase == "lookup":
                    mem = proc_memory(pid)
                    emit_count(n, acc, nbytes, chunks, args.prompts, lookup_iters, len(lookup_hashes) // 16, mem,
                               pool)
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            admin.close()


def emit_count(n: int, acc: dict, nbytes: int, chunks: int, prompts: int, lookup_iters: int, lookup_chunks: int,
               mem: dict[str, int], pool: str) -> None:
    moved = n * prompts * chunks * nbytes
    for op in ("store", "load"):
        a = acc[(n, op)]
        rates = [moved / w / 1e9 for w in a["wall"]]
        emit({"bench": "scale", "workers": n, "op": op, "gbps": round(statistics.median(rates), 2),
              "gbps_min": round(min(rates), 2), "gbps_max": round(max(rates), 2),
              "per_worker_prompt_ms": round(statistics.median(a["lat"]) * 1e3, 1),
              "sidecar_cpu_s_per_gb": round(sum(a["cpu"]) / (moved * len(a["wall"]) / 1e9), 4),
              "evictions": sum(a["evictions"]), "rounds": len(a["wall"]), "bytes_per_round": moved,
              "chunks": chunks, "prompts_per_worker": prompts, "chunk_bytes": nbytes, "host_pool": pool,
              "machine": machine()})
    a = acc[(n, "lookup")]
    emit({"bench": "scale", "workers": n, "op": "lookup", "chunks": lookup_chunks,
          "p50_us": round(percentile(a["lat"], 50) * 1e6, 1), "p99_us": round(percentile(a["lat"], 99) * 1e6, 1),
          "lookups_per_s": round(len(a["lat"]) / a["wall"][0], 1), "iters_per_worker": lookup_iters,
          "sidecar_cpu_us_per_lookup": round(a["cpu"][0] / len(a["lat"]) * 1e6, 1),
          "sidecar_rss": mem, "machine": machine()})


if __name__ == "__main__":
    main()
