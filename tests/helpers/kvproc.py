"""One vLLM rank, as a process: stores or loads a prompt's KV through a real sidecar.

    python tests/helpers/kvproc.py --mode MODE --spec '{"run_dir": ...}'

Modes: ``store``, ``load``; for the fault tests ``reserve-and-hang`` (reserve, fill half
the slots, wait to be killed), ``copy-until-killed`` (reserve, then copy into the slots
over and over), ``pin-and-hang`` (pinned LOOKUP, wait to be killed), ``hold-then-resume``
(a write and a read lease, then wait for SIGUSR1, e.g. across a SIGSTOP, and report what
the stale leases and a fresh store and load do) and ``loop`` (store and load fresh prompts
of prompt-specific bytes until SIGTERM, checking every byte loaded, printing each outage
and recovery).

The paged KV cache has vLLM's CPU layout: ONE buffer, and per layer a view
``[num_blocks, kv_heads, 2 * block_size, head_size]`` of it, filled from a seed so that the
test process can regenerate the expected bytes (:func:`make_cache`). Spec keys:

    run_dir, rank, tp, model ("tiny"), dtype ("bfloat16"), seed (of this instance's cache),
    prompt_seed, chunks (full chunks in the prompt), store_chunks (default: all),
    block_ids (the prompt's blocks, 4 per chunk), client (client config overrides),
    load: offsets_file (from the test's scheduler) or none (own pinned LOOKUP), out (file)

Prints one JSON line at the end (the hanging modes first print ``RESERVED {json}``,
``PINNED {json}`` or ``HELD {json}``). With ``--verify on`` stores send checksums and loads
check them after the copy. The test imports this file too, for the shared geometry and
generators.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # hold-then-resume waits for SIGUSR1 with sigwait: blocked before any import can start a
    # thread (threads inherit the mask), so no thread takes it with the default action (exit).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmkv_mp.engine.client import SidecarClient  # noqa: E402
from lmkv_mp.config import load_client_config  # noqa: E402
from lmkv_mp.wire.keys import HASH_BYTES, Namespace, chain_hashes  # noqa: E402
from lmkv_mp.wire.protocol import NamespaceInfo, SlotStatus  # noqa: E402
from lmkv_mp.engine.paged import PagedKV, slot_checksum  # noqa: E402

NUM_LAYERS = 4
KV_HEADS = 2
BLOCK_SIZE = 16
HEAD_SIZE = 32
NUM_BLOCKS = 64
CHUNK_TOKENS = 64
BLOCKS_PER_CHUNK = CHUNK_TOKENS // BLOCK_SIZE
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def prompt_tokens(prompt_seed: int, chunks: int, tail: int = 10) -> list[int]:
    """A prompt of ``chunks`` full chunks plus a partial tail (never cached)."""
    rng = np.random.default_rng(prompt_seed)
    return rng.integers(0, 32000, chunks * CHUNK_TOKENS + tail).tolist()


def prompt_hashes(prompt_seed: int, chunks: int, key: bytes) -> bytes:
    hashes = chain_hashes(prompt_tokens(prompt_seed, chunks), CHUNK_TOKENS, key)
    assert len(hashes) == chunks * HASH_BYTES
    return hashes


def make_cache(seed: int | None, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """Per-layer views of one buffer; random from ``seed`` (None: zeros)."""
    per_layer = NUM_BLOCKS * KV_HEADS * 2 * BLOCK_SIZE * HEAD_SIZE
    if seed is None:
        buf = torch.zeros(NUM_LAYERS * per_layer, dtype=DTYPES[dtype])
    else:
        gen = torch.Generator().manual_seed(seed)
        buf = torch.randn(NUM_LAYERS * per_layer, generator=gen).to(DTYPES[dtype])
    return {f"model.layers.{i}.self_attn.attn": buf[i * per_layer:(i + 1) * per_layer]
            .view(NUM_BLOCKS, KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE) for i in range(NUM_LAYERS)}


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's shard holds different bytes."""
    return seed * 100 + rank


def namespace_for(kv: PagedKV, model: str, dtype: str, tp: int, rank: int) -> NamespaceInfo:
    ns = Namespace(model=model, revision="main", dtype=dtype, num_layers=NUM_LAYERS, kv_heads=KV_HEADS,
                   head_size=HEAD_SIZE, block_size=BLOCK_SIZE, layout=kv.layout_fingerprint(),
                   chunk_tokens=CHUNK_TOKENS, tp_size=tp, tp_rank=rank)
    return NamespaceInfo(ns.id, kv.chunk_bytes(BLOCKS_PER_CHUNK), ns.display_name)


def block_bytes(cache: dict[str, torch.Tensor], block_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The bytes of ``block_ids`` in every layer (what a load must reproduce)."""
    idx = torch.tensor(list(block_ids), dtype=torch.long)
    return {name: t[idx].contiguous().view(torch.uint8) for name, t in cache.items()}


def chunk_blocks(block_ids: Sequence[int], i: int) -> list[int]:
    return list(block_ids[i * BLOCKS_PER_CHUNK:(i + 1) * BLOCKS_PER_CHUNK])


class Rank:
    """A rank's cache, namespace and connected client."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.rank = spec.get("rank", 0)
        dtype = spec.get("dtype", "bfloat16")
        seed = spec.get("seed")
        self.cache = make_cache(None if seed is None else rank_seed(seed, self.rank), dtype)
        self.kv = PagedKV(self.cache)
        self.ns = namespace_for(self.kv, spec.get("model", "tiny"), dtype, spec.get("tp", 1), self.rank)
        cfg = load_client_config(env={"LMKV_RUN_DIR": spec["run_dir"]}, overrides=spec.get("client"))
        self.client = SidecarClient(cfg, role="worker", name=f"kvproc-r{self.rank}", namespaces=[self.ns])
        if not self.client.connect(timeout=10):
            raise SystemExit(f"kvproc: no sidecar at {cfg.endpoint}")
        assert self.client.hello is not None
        if self.client.hello.chunk_tokens != CHUNK_TOKENS:
            raise SystemExit(f"kvproc: sidecar chunk_tokens {self.client.hello.chunk_tokens} != {CHUNK_TOKENS}")
        self.hashes = prompt_hashes(spec["prompt_seed"], spec["chunks"], self.client.hello.hash_key)
        host = self.client.host_tensor()
        if host is None:
            raise SystemExit("kvproc: cannot map the sidecar's host region")
        self.host = host
        self.chunk_bytes = self.ns.chunk_bytes

    def slot(self, offset: int) -> torch.Tensor:
        return self.host[int(offset):int(offset) + self.chunk_bytes]

    def reserve(self, chunks: int, hashes: bytes | None = None) -> tuple[Any, list[int]]:
        hashes = self.hashes if hashes is None else hashes
        res = self.client.reserve(self.ns.id, hashes[:chunks * HASH_BYTES])
        if res is None:
            raise SystemExit("kvproc: RESERVE failed")
        return res, res.writable().tolist()

    def store(self, hashes: bytes, block_ids: Sequence[int]) -> int:
        """RESERVE, gather, COMMIT (with checksums when the sidecar verifies); chunks
        committed, 0 on any failure."""
        res = self.client.reserve(self.ns.id, hashes)
        if res is None or res.boot_id != self.client.boot_id:
            return 0
        writable = res.writable().tolist()
        for i in writable:
            self.kv.gather(chunk_blocks(block_ids, i), self.slot(res.offsets[i]))
        return self.commit(res.lease_id, hashes, res.offsets, writable)

    def commit(self, lease_id: int, hashes: bytes, offsets: Any, writable: list[int]) -> int:
        if not writable:
            return 0
        if not self.client.verify:
            return self.client.commit(lease_id)
        written = b"".join(hashes[i * HASH_BYTES:(i + 1) * HASH_BYTES] for i in writable)
        return self.client.commit(lease_id, written, [slot_checksum(self.slot(offsets[i])) for i in writable])

    def load(self, found: Any, block_ids: Sequence[int]) -> tuple[int, int]:
        """Scatter a pinned LOOKUP's chunks into ``block_ids``; with checksums, check each
        slot after its copy and report a mismatch. (chunks loaded, chunks found corrupt):
        the load stops at the first corrupt chunk."""
        sums = found.checksums[0].tolist() if found.checksums else []
        for i, off in enumerate(found.offsets[0].tolist() if found.hits else []):
            self.kv.scatter(self.slot(off), chunk_blocks(block_ids, i))
            if sums and slot_checksum(self.slot(off)) != sums[i]:
                self.client.report_corrupt(self.ns.id, self.hashes[i * HASH_BYTES:(i + 1) * HASH_BYTES], [sums[i]])
                return i, 1
        return found.hits, 0


def store(spec: dict[str, Any]) -> dict[str, Any]:
    r = Rank(spec)
    res, writable = r.reserve(spec.get("store_chunks", spec["chunks"]))
    for i in writable:
        r.kv.gather(chunk_blocks(spec["block_ids"], i), r.slot(res.offsets[i]))
    committed = r.commit(res.lease_id, r.hashes, res.offsets, writable)
    return {"mode": "store", "rank": r.rank, "namespace": r.ns.id.hex(), "written": len(writable),
            "present": int((res.status == SlotStatus.PRESENT).sum()), "committed": committed}


def load(spec: dict[str, Any]) -> dict[str, Any]:
    r = Rank(spec)
    lease = corrupt = 0
    if spec.get("offsets_file"):
        with open(spec["offsets_file"]) as f:
            offsets = json.load(f)["offsets"]
        for i, off in enumerate(offsets):
            r.kv.scatter(r.slot(off), chunk_blocks(spec["block_ids"], i))
        n = len(offsets)
    else:
        found = r.client.lookup([r.ns.id], r.hashes, pin=True)
        lease = found.lease_id
        n, corrupt = r.load(found, spec["block_ids"])
    loaded = block_bytes(r.cache, spec["block_ids"][:n * BLOCKS_PER_CHUNK])
    torch.save(loaded, spec["out"])
    released = r.client.release(lease) if lease else False
    return {"mode": "load", "rank": r.rank, "loaded": n, "corrupt": corrupt, "released": released}


def reserve_and_hang(spec: dict[str, Any]) -> None:
    """RESERVE, fill half of the writable slots, announce it, then wait to be killed
    (the heartbeat thread keeps the write lease alive meanwhile)."""
    r = Rank(spec)
    res, writable = r.reserve(spec.get("store_chunks", spec["chunks"]))
    for i in writable[:len(writable) // 2]:
        r.kv.gather(chunk_blocks(spec["block_ids"], i), r.slot(res.offsets[i]))
    print("RESERVED " + json.dumps({"mode": "reserve-and-hang", "rank": r.rank, "lease_id": res.lease_id,
                                    "reserved": len(writable)}), flush=True)
    threading.Event().wait()


def copy_until_killed(spec: dict[str, Any]) -> None:
    """RESERVE, announce it, then copy into every writable slot over and over: a kill
    lands in the middle of a copy."""
    r = Rank(spec)
    res, writable = r.reserve(spec.get("store_chunks", spec["chunks"]))
    print("RESERVED " + json.dumps({"mode": "copy-until-killed", "lease_id": res.lease_id,
                                    "reserved": len(writable)}), flush=True)
    while True:
        for i in writable:
            r.kv.gather(chunk_blocks(spec["block_ids"], i), r.slot(res.offsets[i]))


def pin_and_hang(spec: dict[str, Any]) -> None:
    """A pinned LOOKUP of the prompt (a reader between lookup and load), then wait to be killed."""
    r = Rank(spec)
    found = r.client.lookup([r.ns.id], r.hashes, pin=True)
    print("PINNED " + json.dumps({"mode": "pin-and-hang", "hits": found.hits, "lease_id": found.lease_id}),
          flush=True)
    threading.Event().wait()


def hold_then_resume(spec: dict[str, Any]) -> dict[str, Any]:
    """Hold a read lease on the (stored) prompt and a write lease on ``other_prompt_seed``'s
    chunks, announce ``HELD``, wait for SIGUSR1 (the test stops and continues us meanwhile),
    then report what the stale leases do and whether a fresh store and load work."""
    r = Rank(spec)
    other = prompt_hashes(spec["other_prompt_seed"], spec["chunks"], r.client.hello.hash_key)  # type: ignore[union-attr]
    found = r.client.lookup([r.ns.id], r.hashes, pin=True)
    res, writable = r.reserve(spec["chunks"], other)
    for i in writable:
        r.kv.gather(chunk_blocks(spec["block_ids"], i), r.slot(res.offsets[i]))
    before = r.client.hello.client_id  # type: ignore[union-attr]
    print("HELD " + json.dumps({"hits": found.hits, "read_lease": found.lease_id, "write_lease": res.lease_id,
                                "reserved": len(writable), "client_id": before}), flush=True)
    signal.sigwait({signal.SIGUSR1})
    t0 = time.monotonic()
    stale_commit = r.commit(res.lease_id, other, res.offsets, writable)
    stale_release = r.client.release(found.lease_id)
    calls_s = time.monotonic() - t0
    stored = r.store(other, spec["block_ids"])
    again = r.client.lookup([r.ns.id], r.hashes, pin=True)
    dst = spec["load_block_ids"]
    n, corrupt = r.load(again, dst)
    want = block_bytes(make_cache(rank_seed(spec["seed"], r.rank), spec.get("dtype", "bfloat16")),
                       spec["block_ids"][:n * BLOCKS_PER_CHUNK])
    got = block_bytes(r.cache, dst[:n * BLOCKS_PER_CHUNK])
    released = r.client.release(again.lease_id)
    return {"mode": "hold-then-resume", "stale_commit": stale_commit, "stale_release": stale_release,
            "stale_calls_s": calls_s, "client_id_before": before, "client_id_after": r.client.hello.client_id,
            "stored": stored, "loaded": n, "corrupt": corrupt, "bytes_ok": all(torch.equal(got[k], want[k])
                                                                              for k in want),
            "released": released}


def fill_blocks(cache: dict[str, torch.Tensor], block_ids: Sequence[int], seed: int) -> None:
    """Bytes in ``block_ids`` that only this seed produces (so a chunk of another prompt
    cannot pass for this one)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor(list(block_ids), dtype=torch.long)
    for t in cache.values():
        t[idx] = torch.randn(t[idx].shape, generator=gen).to(t.dtype)


def loop(spec: dict[str, Any]) -> dict[str, Any]:
    """Store and load fresh prompts until SIGTERM. Each iteration fills the source blocks
    with bytes of its own, stores them, loads the pinned hits into other blocks and
    compares; a load during which the sidecar restarted is discarded (its lease no longer
    protected the slots), never counted as served. Prints ``{"event": "down"|"up", "t"}``
    (time.monotonic, one clock for every process) on each outage and recovery."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    r = Rank(spec)
    rng = np.random.default_rng(spec.get("loop_seed", os.getpid()))
    src, dst = spec["block_ids"], spec["load_block_ids"]
    counts = {"iterations": 0, "stored": 0, "loaded": 0, "wrong": 0, "discarded": 0, "misses": 0, "corrupt": 0}
    up = True
    print(json.dumps({"event": "started", "t": time.monotonic()}), flush=True)
    while not stop.is_set():
        counts["iterations"] += 1
        seed = int(rng.integers(1 << 62))
        hashes = prompt_hashes(seed, spec["chunks"], r.client.hello.hash_key)  # type: ignore[union-attr]
        fill_blocks(r.cache, src, seed)
        stored = r.store(hashes, src)
        found = r.client.lookup([r.ns.id], hashes, pin=True) if stored else None
        ok = bool(stored) and found is not None and found.hits > 0
        if ok != up:
            up = ok
            print(json.dumps({"event": "up" if ok else "down", "t": time.monotonic()}), flush=True)
        if not ok:
            counts["misses"] += 1
            continue
        counts["stored"] += stored
        r.hashes = hashes
        n, corrupt = r.load(found, dst)
        counts["corrupt"] += corrupt
        if not r.client.ping() or r.client.boot_id != found.boot_id:
            counts["discarded"] += 1
            continue
        r.client.release(found.lease_id)
        want = block_bytes(r.cache, src[:n * BLOCKS_PER_CHUNK])
        got = block_bytes(r.cache, dst[:n * BLOCKS_PER_CHUNK])
        counts["loaded"] += n
        counts["wrong"] += sum(not torch.equal(got[k], want[k]) for k in want)
    return {"mode": "loop", **counts}


HANGING = {"reserve-and-hang": reserve_and_hang, "copy-until-killed": copy_until_killed,
           "pin-and-hang": pin_and_hang}
REPORTING = {"store": store, "load": load, "hold-then-resume": hold_then_resume, "loop": loop}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=(*HANGING, *REPORTING))
    p.add_argument("--spec", required=True, help="JSON object, see the module docstring")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    if args.mode in HANGING:
        HANGING[args.mode](spec)
        return 0
    print(json.dumps(REPORTING[args.mode](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
