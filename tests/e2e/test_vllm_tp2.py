"""End to end at tensor parallel 2: each rank stores and loads its own shard under its own
namespace, so two TP=2 instances share KV without overwriting each other's shards (the bug
vLLM's ExampleConnector has at TP=2). Engines run once per module (~60 s each here)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from lmkv_mp.demo.tiny_model import build_tiny_llama
from tests.conftest import Procs, SidecarHandle, stats
from tests.e2e.engines import close_output, only, prompt, require_vllm, run_engine, same_output

require_vllm()

pytestmark = pytest.mark.slow

CHUNK = 64
P1 = prompt(11, 280)  # 4 chunks can hit, and 8 blocks of A's own prefix cache: 256 tokens either way
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e-tp2")
    procs = Procs(base)
    model = build_tiny_llama(base / "model", seed=0)
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    sidecar = SidecarHandle(procs, run_dir, ("--chunk-tokens", str(CHUNK), "--lease-timeout", "15s",
                                             "--heartbeat-interval", "1s", "--host-pool-size", "128MiB"))
    sidecar.start()
    spec = {"model": model, "max_tokens": 8, "tp": 2, "turns": [[{"prompt_token_ids": P1}]]}
    lmkv = {"lmkv.endpoint": sidecar.endpoint}
    out: dict[str, Any] = {}
    try:
        out["ref"] = run_engine(procs, {**spec, "lmkv": None}, "ref-tp2", **TP2)
        # A asks P1 twice, the second time from its own prefix cache: what B computes.
        out["A"] = run_engine(procs, {**spec, "lmkv": lmkv, "turns": spec["turns"] * 2}, "A-tp2", **TP2)
        out["after_A"] = stats(sidecar)
        out["B"] = run_engine(procs, {**spec, "lmkv": lmkv}, "B-tp2", **TP2)
        out["after_B"] = stats(sidecar)
        yield out
    finally:
        sidecar.close()
        procs.stop_all()


def test_each_rank_stores_its_own_shard(tp2: dict[str, Any]) -> None:
    namespaces = tp2["after_A"]["namespaces"]
    assert len(namespaces) == 2, namespaces
    assert [ns["entries"] for ns in namespaces] == [len(P1) // CHUNK] * 2
    assert sorted(ns["name"].rsplit("tp", 1)[1] for ns in namespaces) == ["0/2]", "1/2]"]


def test_second_tp2_instance_loads_both_shards_and_matches(tp2: dict[str, Any]) -> None:
    b = only(tp2["B"], 0)
    assert b["num_cached_tokens"] == (len(P1) - 1) // CHUNK * CHUNK
    assert close_output(b, only(tp2["ref"], 0))
    assert same_output(b, only(tp2["A"], 1))
