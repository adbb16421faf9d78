"""Bytes flipped in the shared pool behind the sidecar's back, with ``--verify on``: the
chunk is never served. The loader's copy fails its checksum, the load is a miss (the vLLM
connector reports the blocks for recompute), the sidecar drops the entry on the loader's
report, and the drop is counted under ``lmkv_errors_total{code="CORRUPT"}``."""

from __future__ import annotations

import urllib.request
from typing import Callable

import pytest
import torch

from lmkv_mp.integration.plan import LoadJob, StoreJob

from tests.conftest import Procs, SidecarHandle, stats
from tests.faults.common import B_IDS, N, assert_no_leaks, load_and_check, ns_info, spec
from tests.helpers import kvproc as K
from tests.helpers.redisproc import free_port
from tests.integration.test_vllm_worker import BPC, CHUNK, NS, blocks, cache, plan, worker

pytestmark = pytest.mark.slow


def flip(h: SidecarHandle, offset: int) -> None:
    """One bit of the pool, changed as a stray write or a bad DIMM would."""
    c = h.client(heartbeat=False)
    region = c.host_tensor()
    assert region is not None
    region[offset] ^= 0x10


def test_a_flipped_byte_is_never_served(sidecar: Callable[..., SidecarHandle], procs: Procs) -> None:
    port = free_port()
    h = sidecar("--verify", "on", "--metrics-port", str(port))
    ns = ns_info()
    me = h.client(role="worker", namespaces=[ns])
    assert me.connect() and me.verify
    hashes = K.prompt_hashes(1, N, me.hello.hash_key)  # type: ignore[union-attr]
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == N
    found = me.lookup([ns.id], hashes, pin=True)
    assert found.hits == N and len(found.checksums[0]) == N
    flip(h, int(found.offsets[0][2]) + ns.chunk_bytes // 2)
    me.release(found.lease_id)

    out = procs.result(procs.kvproc("load", spec(h, 1, seed=None, block_ids=B_IDS,
                                                  out=str(procs.log_dir / "loaded.pt"))))
    assert (out["loaded"], out["corrupt"]) == (2, 1), "the load stops at the corrupt chunk"
    assert me.lookup([ns.id], hashes).hits == 2, "never served again: dropped"
    assert load_and_check(me, ns, hashes) == 2, "the chunks before it are intact"
    s = stats(h)
    assert s["errors_by_code"] == {"CORRUPT": 1} and s["corrupt_chunks"] == 1
    assert s["tiers"]["host"]["entries"] == N - 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'lmkv_errors_total{code="CORRUPT"} 1.0' in metrics

    # Stored again (the worker recomputed it), it is served again.
    assert procs.result(procs.kvproc("store", spec(h, 1)))["committed"] == 1
    assert load_and_check(me, ns, hashes) == N
    assert_no_leaks(h, ns.chunk_bytes)


def test_the_vllm_worker_recomputes_a_corrupt_chunk(sidecar: Callable[..., SidecarHandle]) -> None:
    """The connector's worker half: it checksums what it stores when the sidecar verifies,
    checks each chunk after copying it in, and turns a mismatch into load errors (vLLM
    recomputes those blocks) and a report that drops the chunk."""
    from lmkv_mp.wire.keys import chain_hashes

    h = sidecar("--verify", "on")
    a, b = cache(1), cache(2)
    wa = worker(h, a)
    sched = h.client("scheduler")
    assert sched.connect()
    hashes = chain_hashes(list(range(3 * CHUNK)), CHUNK, sched.hello.hash_key)  # type: ignore[union-attr]
    wa.submit_stores(plan(stores=[StoreJob("r1", hashes, list(range(0, 3 * BPC)))]))
    wa.wait_for_inflight()
    assert wa.stats["store_chunks"] == 3 and wa.stats["store_failures"] == 0

    found = sched.lookup([NS], hashes, pin=True)
    assert found.hits == 3 and found.checksums[0].tolist()
    flip(h, int(found.offsets[0][1]) + 100)
    wb = worker(h, b)
    dst = list(range(10, 10 + 3 * BPC))
    wb.submit_loads(plan(loads=[LoadJob("r2", found.boot_id, [found.offsets[0].tolist()],
                                        [found.checksums[0].tolist()], dst, 0, hashes, found.lease_id)]))
    wb.wait_for_inflight()
    assert wb.load_errors() == set(dst), "every block of the job is recomputed"
    assert wb.finished(set()) == (None, {"r2"})
    sched.release(found.lease_id)
    assert sched.lookup([NS], hashes).hits == 1
    assert stats(h)["errors_by_code"] == {"CORRUPT": 1}

    # An intact chunk loads fine under verification.
    ok = sched.lookup([NS], hashes, pin=True)
    wb.submit_loads(plan(loads=[LoadJob("r3", ok.boot_id, [ok.offsets[0].tolist()], [ok.checksums[0].tolist()],
                                        dst[:BPC], 0, hashes[:16], ok.lease_id)]))
    wb.wait_for_inflight()
    assert wb.load_errors() == set()
    for got, want in zip(blocks(b, dst[:BPC]), blocks(a, list(range(BPC)))):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    sched.release(ok.lease_id)
    assert_no_leaks(h)
