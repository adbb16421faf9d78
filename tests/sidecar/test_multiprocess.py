"""Two vLLM instances share a prompt's KV through one sidecar, each rank a real process.

Instance A's ranks (tests/helpers/kvproc.py) store a prompt's chunks; instance B's scheduler
(this test) does ONE pinned LOOKUP for all of B's ranks; B's rank processes scatter the
slots into other block ids; the bytes must equal A's, regenerated from A's seed.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Sequence

import pytest
import torch

from lmkv_mp.wire import protocol as P

from tests.conftest import CLIENT_DEFAULTS, Procs, SidecarHandle, stats
from tests.helpers import kvproc as K

SEED_A, SEED_B = 21, 22
PROMPT = 7
N = 4


def block_ids(seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """N chunks' worth of distinct, shuffled block ids (not in ``exclude``)."""
    free = [b for b in range(K.NUM_BLOCKS) if b not in exclude]
    return random.Random(seed).sample(free, N * K.BLOCKS_PER_CHUNK)


def ns_info(tp: int, rank: int, model: str = "tiny", dtype: str = "bfloat16") -> P.NamespaceInfo:
    return K.namespace_for(K.PagedKV(K.make_cache(None, dtype)), model, dtype, tp, rank)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_instances_share_kv_across_processes(tp: int, sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    h = sidecar()
    a_ids = block_ids(1)
    b_ids = block_ids(2, exclude=a_ids)
    base: dict[str, Any] = {"run_dir": str(h.run_dir), "tp": tp, "prompt_seed": PROMPT, "chunks": N,
                            "client": CLIENT_DEFAULTS}

    stores = [procs.kvproc("store", {**base, "rank": r, "seed": SEED_A, "block_ids": a_ids}) for r in range(tp)]
    results = [procs.result(p) for p in stores]
    namespaces = [ns_info(tp, r) for r in range(tp)]
    assert [res["namespace"] for res in results] == [ns.id.hex() for ns in namespaces]
    assert len({ns.id for ns in namespaces}) == tp, "ranks differ by tp_rank only, and that is enough"
    assert all(res["written"] == N and res["committed"] == N for res in results)

    sched = h.client(role="scheduler")
    assert sched.connect()
    hashes = K.prompt_hashes(PROMPT, N, sched.hello.hash_key)  # type: ignore[union-attr]
    longer = K.prompt_hashes(PROMPT, N + 2, sched.hello.hash_key)  # type: ignore[union-attr]
    assert longer[:len(hashes)] == hashes
    found = sched.lookup([ns.id for ns in namespaces], longer, pin=True)
    assert found.hits == N and found.lease_id and len(found.offsets) == tp
    assert all(len(o) == N for o in found.offsets)
    assert len({int(o) for offs in found.offsets for o in offs}) == N * tp

    loads = []
    for r in range(tp):
        offsets_file = procs.log_dir / f"offsets-r{r}.json"
        offsets_file.write_text(json.dumps({"offsets": found.offsets[r].tolist()}))
        loads.append(procs.kvproc("load", {**base, "rank": r, "seed": SEED_B, "block_ids": b_ids,
                                           "offsets_file": str(offsets_file),
                                           "out": str(procs.log_dir / f"loaded-r{r}.pt")}))
    for r, p in enumerate(loads):
        assert procs.result(p)["loaded"] == N
        got = torch.load(procs.log_dir / f"loaded-r{r}.pt")
        want = K.block_bytes(K.make_cache(K.rank_seed(SEED_A, r)), a_ids)
        before = K.block_bytes(K.make_cache(K.rank_seed(SEED_B, r)), b_ids)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {r} {name}"
            assert not torch.equal(got[name], before[name])

    assert sched.release(found.lease_id)
    s = stats(h)
    assert s["leases"] == {"read": 0, "write": 0}
    assert s["loads"] == N * tp and s["stores"] == N * tp
    assert s["tiers"]["host"]["entries"] == N * tp

    # B's ranks would store the same prompt after their prefill: nothing to write.
    for ns in namespaces:
        again = h.client(role="worker", namespaces=[ns]).reserve(ns.id, hashes)
        assert again is not None and again.lease_id == 0
        assert set(again.status) == {P.SlotStatus.PRESENT}


def store_metadata(h: SidecarHandle, ns: P.NamespaceInfo, hashes: bytes) -> int:
    """RESERVE + COMMIT without copying bytes: enough for hit accounting."""
    writer = h.client(role="worker", namespaces=[ns])
    res = writer.reserve(ns.id, hashes)
    assert res is not None
    return writer.commit(res.lease_id) if res.lease_id else 0


@pytest.mark.slow
def test_chunk_hits_only_when_every_rank_committed(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar()
    r0, r1 = ns_info(2, 0), ns_info(2, 1)
    sched = h.client(role="scheduler")
    assert sched.connect()
    hashes = K.prompt_hashes(PROMPT, N, sched.hello.hash_key)  # type: ignore[union-attr]
    assert store_metadata(h, r0, hashes) == N
    assert store_metadata(h, r1, hashes[:-16]) == N - 1  # rank 1 has not stored the last chunk
    assert sched.lookup([r0.id, r1.id], hashes).hits == N - 1
    assert sched.lookup([r0.id], hashes).hits == N
    pinned = sched.lookup([r0.id, r1.id], hashes, pin=True)
    assert pinned.hits == N - 1 and [len(o) for o in pinned.offsets] == [N - 1, N - 1]
    assert sched.release(pinned.lease_id)
    assert store_metadata(h, r1, hashes) == 1
    assert sched.lookup([r0.id, r1.id], hashes).hits == N


@pytest.mark.slow
def test_different_namespaces_never_hit_each_other(sidecar: Callable[..., SidecarHandle]) -> None:
    h = sidecar()
    mine = ns_info(1, 0)
    others = [ns_info(1, 0, model="other-model"), ns_info(1, 0, dtype="float16"), ns_info(2, 0)]
    assert len({mine.id, *(o.id for o in others)}) == 4
    sched = h.client(role="scheduler")
    assert sched.connect()
    hashes = K.prompt_hashes(PROMPT, N, sched.hello.hash_key)  # type: ignore[union-attr]
    assert store_metadata(h, mine, hashes) == N
    for other in others:
        assert sched.lookup([other.id], hashes).hits == 0
        assert sched.lookup([mine.id, other.id], hashes).hits == 0
        assert store_metadata(h, other, hashes) == N, "the same hashes are new in another namespace"
    assert sched.lookup([mine.id], hashes).hits == N
    assert stats(h)["tiers"]["host"]["entries"] == N * 4
