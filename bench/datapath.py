"""Store and load of KV chunks through a real sidecar, against memcpy of the same bytes.

A worker of a Llama-3-8B-like shard (32 layers, 8 KV heads, head size 128, bf16: 128 KiB
per token, 32 MiB per 256-token chunk) holds vLLM's CPU paged KV cache: ONE buffer, per
layer a view ``[num_blocks, kv_heads, block_size, 2*head_size]``, block size 16. Each
iteration is one fresh prompt of ``--chunks`` chunks whose blocks lie at random block ids
(a cache that has been running a while), done as the vLLM worker does it:

* store: RESERVE -> ``PagedKV.gather`` each chunk into its slot -> COMMIT;
* load:  LOOKUP(pin) -> ``PagedKV.scatter`` each chunk into other block ids -> RELEASE.

Both are timed end to end (RPCs included). The limit, measured in the same process and
interleaved with the iterations (so a loaded machine slows both alike): ``dst.copy_(src)``
of the same bytes, chunk by chunk, between two private buffers as large as the prompt, so
that, as in the copies through the sidecar, neither side is served from a cache
(``memcpy_gbps``); and the same copy into / out of slots of the shared pool that this
process has already touched (``shm_memcpy_gbps``). The host pool is sized so nothing is evicted (a smaller
``--pool-size`` lets RESERVE evict); the line counts evictions. One JSON line per op:

    {"bench":"datapath","op":"store"|"load","gbps":…,"memcpy_gbps":…,"ratio":…,…}

Where the time goes: ``rpc_ms`` (the RPCs of the median iteration), ``copy_gbps`` (the
copies alone), ``page_faults`` (minor faults per iteration; 0 while the client maps the
pool with its page tables populated; a slot first touched by a copy would fault on every
4 KiB page, 8192 per chunk, which measured here at half the store throughput).
``--block-ids consecutive`` gives each prompt one run of block ids (a fresh engine).
``--threads`` defaults to 1, as the vLLM connector's copy thread runs (the engine's threads
own the cores); the memcpy limit then runs on one thread too. ``--threads 0`` uses torch's
default: the index copies are many small parallel regions, and with a core taken by
another process they wait on each other (here: up to 100x slower with 2 threads).
``--copy-threads N`` splits each chunk's copy over N threads as the connector's
``lmkv.copy_threads`` does (copy_threads.CopyThreads, one torch thread each); the memcpy limits
are then split the same way over the same threads (the line says ``copy_threads``).

``--chunk-tokens`` sets the sidecar's chunk size (default 256, a multiple of the block
size); by default a prompt stays 2048 tokens (quick: 1024), so runs at different chunk
sizes move the same bytes per iteration and differ only in how they are cut.

``--verify`` runs the sidecar with ``--verify on`` and does what the connector then does:
a store hashes each slot after its gather and sends the checksums at COMMIT, a load
hashes each slot after its scatter and compares. The line then carries ``verify: true``
and, as the limit of that extra pass, ``checksum_gbps`` (xxh3-64 of the same bytes alone,
measured in the same run); compare with a run without ``--verify`` for the cost.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, sidecar  # noqa: E402

from lmkv_mp.wire import protocol as P  # noqa: E402
from lmkv_mp.engine.client import SidecarClient  # noqa: E402
from lmkv_mp.wire.keys import Namespace, chain_hashes  # noqa: E402
from lmkv_mp.engine.copy_threads import CopyThreads  # noqa: E402
from lmkv_mp.engine.paged import PagedKV, slot_checksum  # noqa: E402

LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, CHUNK_TOKENS = 32, 8, 128, 16, 256
BPC = CHUNK_TOKENS // BLOCK_SIZE
SLAB = 64 << 20
PROMPT_TOKENS, QUICK_PROMPT_TOKENS = 2048, 1024


def cpu_kv_cache(num_blocks: int, seed: int) -> list[torch.Tensor]:
    """vLLM's CPU layout: per-layer views of one buffer, filled with random bf16 bits."""
    per_layer = num_blocks * KV_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE
    buf = torch.empty(LAYERS * per_layer, dtype=torch.bfloat16)
    buf.view(torch.int16).random_(generator=torch.Generator().manual_seed(seed))
    return [buf[i * per_layer:(i + 1) * per_layer].view(num_blocks, KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
            for i in range(LAYERS)]


class Prompts:
    """Fresh prompts: random tokens (so new chain hashes), block ids to store from and
    disjoint ones to load into (random, or two runs of consecutive ids), per chunk one
    list of ``chunk_tokens / BLOCK_SIZE`` block ids."""

    def __init__(self, chunks: int, num_blocks: int, hash_key: bytes, seed: int, consecutive: bool,
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        self.chunks, self.num_blocks, self.hash_key = chunks, num_blocks, hash_key
        self.consecutive, self.chunk_tokens = consecutive, chunk_tokens
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[bytes, list[list[int]], list[list[int]]]:
        bpc = self.chunk_tokens // BLOCK_SIZE
        tokens = self.rng.integers(0, 128_000, self.chunks * self.chunk_tokens)
        need = 2 * self.chunks * bpc
        if self.consecutive:
            start = int(self.rng.integers(0, self.num_blocks - need + 1))
            ids = list(range(start, start + need))
        else:
            ids = self.rng.permutation(self.num_blocks)[:need].tolist()
        split = [ids[i * bpc:(i + 1) * bpc] for i in range(2 * self.chunks)]
        return chain_hashes(tokens, self.chunk_tokens, self.hash_key), split[:self.chunks], split[self.chunks:]


def store(client: SidecarClient, paged: PagedKV, ns: bytes, hashes: bytes, block_ids: list[list[int]],
          nbytes: int, verify: bool = False, threads: CopyThreads | None = None) -> tuple[float, float]:
    """One prompt's store as the worker does it; returns (total, rpc) seconds."""
    t0 = time.perf_counter()
    res = client.reserve(ns, hashes)
    t1 = time.perf_counter()
    host = client.host_tensor()
    if res is None or host is None:
        raise RuntimeError("RESERVE failed or the host pool could not be mapped")
    written = res.writable().tolist()
    if len(written) != len(block_ids):
        raise RuntimeError(f"only {len(written)} of {len(block_ids)} chunks writable: {res.status}")
    sums = []
    for i in written:
        off = int(res.offsets[i])
        paged.gather(block_ids[i], host[off:off + nbytes], threads)
        if verify:
            sums.append(slot_checksum(host[off:off + nbytes]))
    t2 = time.perf_counter()
    committed = client.commit(res.lease_id, hashes, sums) if verify else client.commit(res.lease_id)
    t3 = time.perf_counter()
    if committed != len(block_ids):
        raise RuntimeError(f"COMMIT made {committed} of {len(block_ids)} chunks visible")
    return t3 - t0, (t1 - t0) + (t3 - t2)


def load(client: SidecarClient, paged: PagedKV, ns: bytes, hashes: bytes, block_ids: list[list[int]],
         nbytes: int, verify: bool = False, threads: CopyThreads | None = None) -> tuple[float, float]:
    """One prompt's load as the worker does it; returns (total, rpc) seconds."""
    t0 = time.perf_counter()
    r = client.lookup([ns], hashes, pin=True)
    t1 = time.perf_counter()
    host = client.host_tensor()
    if r.hits != len(block_ids) or host is None:
        raise RuntimeError(f"LOOKUP hit {r.hits} of {len(block_ids)} chunks (or the pool could not be mapped)")
    sums = r.checksums[0].tolist() if verify else []
    if verify and len(sums) != len(block_ids):
        raise RuntimeError("--verify: the LOOKUP carried no checksums")
    for i, off in enumerate(r.offsets[0].tolist()):
        paged.scatter(host[off:off + nbytes], block_ids[i], threads=threads)
        if verify and slot_checksum(host[off:off + nbytes]) != sums[i]:
            raise RuntimeError(f"chunk {i} failed its checksum after the load")
    t2 = time.perf_counter()
    released = client.release(r.lease_id)
    t3 = time.perf_counter()
    if not released:
        raise RuntimeError("RELEASE failed")
    return t3 - t0, (t1 - t0) + (t3 - t2)


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: CopyThreads | None) -> None:
    """``dst.copy_(src)`` for each pair; with ``threads``, each pair cut into LAYERS pieces
    shared out as the connector shares a chunk's per-layer copies (one split per chunk)."""
    for d, s in pairs:
        if threads is None:
            d.copy_(s)
        else:
            threads.run(_copy_pieces, list(zip(d.chunk(LAYERS), s.chunk(LAYERS))))


def _copy_pieces(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for d, s in pieces:
        d.copy_(s)


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                    help=f"tokens per chunk, a multiple of {BLOCK_SIZE} [{CHUNK_TOKENS}]")
    ap.add_argument("--chunks", type=int, default=None,
                    help=f"chunks per iteration (one prompt) [{PROMPT_TOKENS} tokens' worth: 8 at {CHUNK_TOKENS} "
                         f"tokens; quick {QUICK_PROMPT_TOKENS} tokens' worth]")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per op [10; quick 5]")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for the copies and the memcpy limit (default 1: what the vLLM "
                         "connector's copy thread uses; 0 = torch's choice)")
    ap.add_argument("--copy-threads", type=int, default=1,
                    help="threads each chunk's copy is split over, as lmkv.copy_threads does; the memcpy "
                         "limits are split alike [1]")
    ap.add_argument("--pool-size", default=None,
                    help="host pool size, e.g. 1GiB (default: room for every prompt, so nothing is evicted)")
    ap.add_argument("--block-ids", choices=("random", "consecutive"), default="random",
                    help="where a prompt's blocks lie in the paged cache")
    ap.add_argument("--verify", action="store_true",
                    help="run the sidecar with --verify on: checksums at COMMIT, checked after each load")
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under a minute)")
    args = ap.parse_args()
    if not 1 <= args.copy_threads <= 64:
        ap.error("--copy-threads must be from 1 to 64")
    if args.chunk_tokens <= 0 or args.chunk_tokens % BLOCK_SIZE:
        ap.error(f"--chunk-tokens must be a positive multiple of the block size {BLOCK_SIZE}")
    chunk_tokens, bpc = args.chunk_tokens, args.chunk_tokens // BLOCK_SIZE
    chunks = args.chunks or max(1, (QUICK_PROMPT_TOKENS if args.quick else PROMPT_TOKENS) // chunk_tokens)
    iters = args.iters or (5 if args.quick else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = CopyThreads(args.copy_threads) if args.copy_threads > 1 else None

    num_blocks = 3 * chunks * bpc + bpc  # a store's blocks and a load's disjoint ones, with room to spare
    paged = PagedKV(cpu_kv_cache(num_blocks, seed=0), num_blocks=num_blocks, block_dim=0)
    nbytes = paged.chunk_bytes(bpc)
    # Every prompt (warm-up included) stays, plus the scratch reservation the shm copy uses,
    # plus a slab for the segment's header and slot table. A chunk larger than SLAB gets a
    # slab of its own size (whole MiB).
    slots = (iters + 2) * chunks
    slab_bytes = max(SLAB, -(-nbytes // (1 << 20)) << 20)
    per_slab = max(1, slab_bytes // nbytes)
    pool = args.pool_size or f"{(-(-slots // per_slab) + 1) * slab_bytes >> 20}MiB"
    slab = f"{slab_bytes >> 20}MiB"
    # As many private bytes as the prompt, each chunk its own range: a limit that copied
    # one chunk-sized pair again and again would run from the last-level cache once a
    # chunk pair fits in it (8 MiB chunks on a 32 MiB L3: "memcpy" at 29 GB/s).
    srcs = torch.empty(chunks * nbytes, dtype=torch.uint8).fill_(1).split(nbytes)
    dsts = torch.empty(chunks * nbytes, dtype=torch.uint8).fill_(2).split(nbytes)

    with sidecar(pool, slab, "--chunk-tokens", str(chunk_tokens), "--verify", "on" if args.verify else "off") as sc:
        ns = Namespace("llama-3-8b-like", "bench", "bfloat16", LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE,
                       paged.layout_fingerprint(), chunk_tokens, 1, 0).id
        client = SidecarClient(sc.client_config(), role="worker", namespaces=[P.NamespaceInfo(ns, nbytes, "bench")])
        if not client.connect() or client.hello is None:
            raise RuntimeError("HELLO failed")
        prompts = Prompts(chunks, num_blocks, client.hello.hash_key, seed=1,
                          consecutive=args.block_ids == "consecutive", chunk_tokens=chunk_tokens)
        host = client.host_tensor()
        if host is None:
            raise RuntimeError("the host pool could not be mapped")

        # The shm limit copies into / out of slots of a reservation held open (never committed).
        scratch = prompts.next()[0]
        res = client.reserve(ns, scratch)
        if res is None or len(res.writable()) != chunks:
            raise RuntimeError("no room for the scratch reservation")
        shm = [host[int(o):int(o) + nbytes] for o in res.offsets]

        def memcpy() -> None:
            copy_pairs(list(zip(dsts, srcs)), threads)

        def shm_in() -> None:
            copy_pairs(list(zip(shm, srcs)), threads)

        def shm_out() -> None:
            copy_pairs(list(zip(dsts, shm)), threads)

        def hash_only() -> None:
            for s in shm:
                slot_checksum(s)

        # Warm-up (untimed), which also checks the bytes round-trip between disjoint blocks.
        hashes, ids_from, ids_to = prompts.next()
        store(client, paged, ns, hashes, ids_from, nbytes, args.verify, threads)
        load(client, paged, ns, hashes, ids_to, nbytes, args.verify, threads)
        for a, b in zip(ids_from, ids_to):
            for layer in paged.parts:
                if not torch.equal(layer[a].view(torch.int16), layer[b].view(torch.int16)):
                    raise RuntimeError("the loaded blocks differ from the stored ones")
        for fn in (memcpy, shm_in, shm_out, hash_only):
            fn()

        # Each iteration stores a fresh prompt, then loads it back into other blocks (a
        # prompt is far beyond the last-level cache, so the load reads memory, not cache).
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(iters):
            hashes, ids_from, ids_to = prompts.next()
            for op, fn, ids, shm_fn in (("store", store, ids_from, shm_in), ("load", load, ids_to, shm_out)):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                total, rpc = fn(client, paged, ns, hashes, ids, nbytes, args.verify, threads)
                times[f"{op}_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                times[op].append(total)
                times[f"{op}_rpc"].append(rpc)
                times[f"{op}_copy"].append(total - rpc)
                times["memcpy"].append(timed(memcpy))
                times[shm_fn.__name__].append(timed(shm_fn))
                if args.verify:
                    times["checksum"].append(timed(hash_only))
        client.release(res.lease_id)
        evictions = int(client.stats()["evictions"])
        client.close()

    moved = chunks * nbytes
    med = {k: statistics.median(v) for k, v in times.items()}
    memcpy_gbps = moved / med["memcpy"] / 1e9
    for op, shm_key in (("store", "shm_in"), ("load", "shm_out")):
        gbps = moved / med[op] / 1e9
        emit({"bench": "datapath", "op": op, "gbps": round(gbps, 2), "memcpy_gbps": round(memcpy_gbps, 2),
              "ratio": round(gbps / memcpy_gbps, 3), "shm_memcpy_gbps": round(moved / med[shm_key] / 1e9, 2),
              "ms": round(med[op] * 1e3, 2), "rpc_ms": round(med[f"{op}_rpc"] * 1e3, 2),
              "copy_gbps": round(moved / med[f"{op}_copy"] / 1e9, 2), "page_faults": int(med[f"{op}_faults"]),
              "verify": args.verify, "copy_threads": args.copy_threads,
              **({"checksum_gbps": round(moved / med["checksum"] / 1e9, 2)} if args.verify else {}),
              "chunk_tokens": chunk_tokens, "chunk_bytes": nbytes, "chunks": chunks, "iters": iters,
              "block_ids": args.block_ids, "host_pool": pool, "evictions": evictions, "machine": machine()})


if __name__ == "__main__":
    main()
