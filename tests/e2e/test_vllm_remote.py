"""End to end across "nodes": engine A on sidecar 1, engine B on sidecar 2, the two
sidecars sharing one real redis-server as their remote tier. B's prompt was computed by A
only; B must get it through Redis (prefetched into its own host tier) and answer exactly
as A did when it asked the prompt again, from its own prefix cache of the same length."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from lmkv_mp.demo.tiny_model import build_tiny_llama
from tests.conftest import Procs, SidecarHandle, stats, wait_for
from tests.e2e.engines import close_output, only, prompt, require_vllm, run_engine, same_output
from tests.helpers.redisproc import RedisServer, require_redis_server

require_vllm()
require_redis_server()

pytestmark = pytest.mark.slow

CHUNK = 64
P1 = prompt(21, 280)  # 4 chunks can hit, and 8 blocks of A's own prefix cache: 256 tokens either way


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e-remote")
    procs = Procs(base)
    model = build_tiny_llama(base / "model", seed=0)
    out: dict[str, Any] = {}
    with RedisServer() as redis:
        flags = ("--chunk-tokens", str(CHUNK), "--lease-timeout", "15s", "--heartbeat-interval", "1s",
                 "--host-pool-size", "128MiB", "--remote-url", redis.url, "--write-policy", "write-through")
        sidecars = [SidecarHandle(procs, Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp")), flags) for _ in range(2)]
        try:
            for s in sidecars:
                s.start()
            spec = {"model": model, "max_tokens": 8, "turns": [[{"prompt_token_ids": P1}]]}
            # A asks P1 twice, the second time from its own prefix cache: what B computes.
            out["A"] = run_engine(procs, {**spec, "lmkv": {"lmkv.endpoint": sidecars[0].endpoint},
                                          "turns": spec["turns"] * 2}, "A-node1")
            out["node1"] = wait_for(lambda: (s := stats(sidecars[0]))["tier_movers"]["in_flight"] == 0 and s, 60,
                                    "node 1's copies to redis")
            out["B"] = run_engine(procs, {**spec, "lmkv": {"lmkv.endpoint": sidecars[1].endpoint,
                                                           "lmkv.prefetch_timeout": "20s"}}, "B-node2")
            out["node2"] = stats(sidecars[1])
            yield out
        finally:
            for s in sidecars:
                s.close()
            procs.stop_all()


def test_node1_copies_its_chunks_to_redis(nodes: dict[str, Any]) -> None:
    remote = nodes["node1"]["tiers"]["remote"]
    assert remote["stored_chunks"] == len(P1) // CHUNK and remote["errors"] == 0


def test_node2_hits_through_redis_with_identical_output(nodes: dict[str, Any]) -> None:
    b = only(nodes["B"], 0)
    assert b["num_cached_tokens"] == (len(P1) - 1) // CHUNK * CHUNK
    assert same_output(b, only(nodes["A"], 1))
    assert close_output(b, only(nodes["A"], 0))  # A's full recompute: another computation
    assert nodes["node2"]["tiers"]["remote"]["hit_chunks"] == (len(P1) - 1) // CHUNK
