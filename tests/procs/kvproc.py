"""One vLLM rank, as a process: stores or loads a prompt's KV through a real sidecar.

    python tests/procs/kvproc.py --mode store|load|reserve-and-hang --spec '{"run_dir": ...}'

The paged KV cache has vLLM's CPU layout: ONE buffer, and per layer a view
``[num_blocks, kv_heads, 2 * block_size, head_size]`` of it, filled from a seed so that the
test process can regenerate the expected bytes (:func:`make_cache`). Spec keys:

    run_dir, rank, tp, model ("tiny"), dtype ("bfloat16"), seed (of this instance's cache),
    prompt_seed, chunks (full chunks in the prompt), store_chunks (default: all),
    block_ids (the prompt's blocks, 4 per chunk), client (client config overrides),
    load: offsets_file (from the test's scheduler) or none (own pinned LOOKUP), out (file)

Prints one JSON line at the end (reserve-and-hang: ``RESERVED {json}``, then blocks until
killed). The test imports this file too, for the shared geometry and generators.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any, Sequence

import numpy as np
import torch

from lmkv_mp.client import SidecarClient
from lmkv_mp.config import load_client_config
from lmkv_mp.keys import HASH_BYTES, Namespace, chain_hashes
from lmkv_mp.protocol import NamespaceInfo, SlotStatus
from lmkv_mp.transfer import PagedKV

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

    def reserve(self, chunks: int) -> tuple[Any, list[int]]:
        res = self.client.reserve(self.ns.id, self.hashes[:chunks * HASH_BYTES])
        if res is None:
            raise SystemExit("kvproc: RESERVE failed")
        return res, res.writable().tolist()


def store(spec: dict[str, Any]) -> dict[str, Any]:
    r = Rank(spec)
    res, writable = r.reserve(spec.get("store_chunks", spec["chunks"]))
    for i in writable:
        r.kv.gather(chunk_blocks(spec["block_ids"], i), r.slot(res.offsets[i]))
    committed = r.client.commit(res.lease_id) if res.lease_id else 0
    return {"mode": "store", "rank": r.rank, "namespace": r.ns.id.hex(), "written": len(writable),
            "present": int((res.status == SlotStatus.PRESENT).sum()), "committed": committed}


def load(spec: dict[str, Any]) -> dict[str, Any]:
    r = Rank(spec)
    lease = 0
    if spec.get("offsets_file"):
        with open(spec["offsets_file"]) as f:
            offsets = json.load(f)["offsets"]
    else:
        found = r.client.lookup([r.ns.id], r.hashes, pin=True)
        lease = found.lease_id
        offsets = found.offsets[0].tolist() if found.hits else []
    for i, off in enumerate(offsets):
        r.kv.scatter(r.slot(off), chunk_blocks(spec["block_ids"], i))
    loaded = block_bytes(r.cache, spec["block_ids"][:len(offsets) * BLOCKS_PER_CHUNK])
    torch.save(loaded, spec["out"])
    released = r.client.release(lease) if lease else False
    return {"mode": "load", "rank": r.rank, "loaded": len(offsets), "released": released}


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=("store", "load", "reserve-and-hang"))
    p.add_argument("--spec", required=True, help="JSON object, see the module docstring")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    if args.mode == "reserve-and-hang":
        reserve_and_hang(spec)
        return 0
    result = store(spec) if args.mode == "store" else load(spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
