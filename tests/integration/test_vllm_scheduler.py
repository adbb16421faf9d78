"""The connector's scheduler half against a real sidecar, driven with stand-ins for vLLM's
Request and SchedulerOutput (only the fields the connector reads), so every branch of the
lease and plan bookkeeping is exercised without starting an engine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import pytest

from lmkv_mp.integration.plan import rank_namespaces
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.wire.keys import chain_hashes
from lmkv_mp.wire.protocol import NamespaceInfo
from tests.conftest import SidecarHandle, stats, wait_for

CHUNK, BLOCK = 64, 32
BPC = CHUNK // BLOCK


def namespaces(tp: int = 1) -> list:
    return rank_namespaces(model="m", revision="", dtype="bf16", num_layers=2, kv_heads=2, head_size=32,
                           block_size=BLOCK, layout="test", chunk_tokens=CHUNK, tp_size=tp, mla=False, tenant="")


def request(rid: str, tokens: list[int], salt: str | None = None) -> Any:
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens, cache_salt=salt)


def output(new: list[tuple[str, list[int], int, int]] = (), cached: list[tuple[str, list[int] | None, int, int]] = (),
           preempted: set[str] = frozenset(), resumed: set[str] = frozenset()) -> Any:
    """SchedulerOutput stand-in: new = (req_id, block_ids, num_computed, num_scheduled)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, *_ in cached], resumed_req_ids=set(resumed),
                                              new_block_ids=[(b,) if b else None for _, b, _, _ in cached],
                                              num_computed_tokens=[c for _, _, c, _ in cached]),
        num_scheduled_tokens={r: n for r, _, _, n in [*new, *cached]},
        preempted_req_ids=set(preempted))


def store_chunks(handle: SidecarHandle, tokens: list[int], n: int, tp: int = 1) -> None:
    """Commit the first n chunks of ``tokens`` in every rank's namespace (as ranks would)."""
    for ns in namespaces(tp):
        w = handle.client("worker", namespaces=[NamespaceInfo(ns.id, 4096, "t")], heartbeat=False)
        assert w.connect()
        res = w.reserve(ns.id, chain_hashes(tokens, CHUNK, w.hello.hash_key)[:16 * n])
        assert res is not None and w.commit(res.lease_id) == n


@pytest.fixture
def side(sidecar: Callable[..., SidecarHandle]) -> tuple[SidecarHandle, SchedulerSide]:
    handle = sidecar()
    client = handle.client("scheduler")
    return handle, SchedulerSide(client, namespaces(), CHUNK, BLOCK)


TOKENS = list(range(10, 10 + 5 * CHUNK))  # 5 full chunks


def test_claims_pinned_whole_chunks_and_answers_repeats_from_cache(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 5)
    req = request("r1", TOKENS)
    # 5 chunks stored, but the last prompt token must be computed by the engine: 4 claimable.
    assert s.get_num_new_matched_tokens(req, 0) == (4 * CHUNK, True)
    assert s.get_num_new_matched_tokens(req, 0) == (4 * CHUNK, True)
    assert s.stats["lookups"] == 1
    assert stats(handle)["leases"]["read"] == 1


def test_local_hit_covering_everything_claims_nothing_and_drops_the_lease(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 2)
    assert s.get_num_new_matched_tokens(request("r1", TOKENS), 3 * CHUNK) == (0, False)
    assert stats(handle)["leases"]["read"] == 0


def test_load_plan_starts_after_the_engines_own_blocks(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 4)
    req = request("r1", TOKENS)
    local = BLOCK  # the engine holds one block: half of chunk 0
    ext, _ = s.get_num_new_matched_tokens(req, local)
    assert ext == 4 * CHUNK - local
    blocks = list(range(100, 110))
    s.update_state_after_alloc(req, blocks, ext)
    (job,) = s.build_plan(output()).loads
    assert job.skip_blocks == 1 and job.block_ids == blocks[1:4 * BPC]
    assert len(job.offsets) == 1 and len(job.offsets[0]) == 4


def planned_load(handle: SidecarHandle, s: SchedulerSide) -> Any:
    """Three chunks stored, request r1 claims them and its load goes out in a plan."""
    store_chunks(handle, TOKENS, 3)
    req = request("r1", TOKENS)
    ext, _ = s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, list(range(20)), ext)
    s.build_plan(output())
    return req


def test_lease_is_held_until_every_rank_reported_the_load(side: tuple) -> None:
    handle, s = side
    req = planned_load(handle, s)
    assert s.request_finished(req) is False        # aborted while loading: lease must stay
    assert stats(handle)["leases"]["read"] == 1
    s.on_worker_output({"r1"})
    assert stats(handle)["leases"]["read"] == 0


def test_preempted_request_is_pinned_again_before_claiming(side: tuple) -> None:
    handle, s = side
    req = planned_load(handle, s)
    s.on_worker_output({"r1"})                      # load done, lease released
    s.build_plan(output(preempted={"r1"}))
    assert s.get_num_new_matched_tokens(req, 0) == (3 * CHUNK, True)
    assert s.stats["lookups"] == 2                  # a fresh pinned lookup, not the stale answer
    s.update_state_after_alloc(req, list(range(30, 50)), 3 * CHUNK)
    assert len(s.build_plan(output()).loads) == 1


def test_stores_are_planned_once_per_computed_chunk(side: tuple) -> None:
    handle, s = side
    req = request("r1", TOKENS)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = list(range(5 * BPC))
    plan = s.build_plan(output(new=[("r1", blocks, 0, 2 * CHUNK + 5)]))   # chunked prefill, part 1
    (job,) = plan.stores
    assert len(job.hashes) == 2 * 16 and job.block_ids == blocks[:2 * BPC]
    plan = s.build_plan(output(cached=[("r1", None, 2 * CHUNK + 5, 3 * CHUNK)]))
    (job,) = plan.stores
    assert len(job.hashes) == 3 * 16 and job.block_ids == blocks[2 * BPC:5 * BPC]
    assert s.build_plan(output(cached=[("r1", None, 5 * CHUNK + 5, 1)])).stores == []
    assert s.request_finished(req) is True          # stores were planned: blocks wait for them


def test_hits_need_every_rank_and_the_same_salt(sidecar: Callable[..., SidecarHandle]) -> None:
    handle = sidecar()
    s = SchedulerSide(handle.client("scheduler"), namespaces(tp=2), CHUNK, BLOCK)
    store_chunks(handle, TOKENS, 5, tp=2)
    assert s.get_num_new_matched_tokens(request("a", TOKENS), 0) == (4 * CHUNK, True)
    assert s.get_num_new_matched_tokens(request("b", TOKENS, salt="tenant-x"), 0) == (0, False)
    one_rank = SchedulerSide(handle.client("scheduler"), namespaces(tp=2), CHUNK, BLOCK)
    other = list(range(900, 900 + 3 * CHUNK))
    store_chunks(handle, other, 2, tp=1)            # only a TP=1 namespace has them
    assert one_rank.get_num_new_matched_tokens(request("c", other), 0) == (0, False)


def test_dead_sidecar_means_no_claim(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 3)
    handle.kill()
    wait_for(lambda: not handle.alive(), 10, "the sidecar to die")
    assert s.get_num_new_matched_tokens(request("r9", TOKENS), 0) == (0, False)
