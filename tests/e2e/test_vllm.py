"""End to end: real vLLM (CPU) engines, each in its own process, sharing KV through a real
sidecar. The engines run once per module (an engine start costs ~30 s here); each test
asserts one property of what they produced."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from lmkv_mp.demo.tiny_model import build_tiny_llama
from tests.conftest import Procs, SidecarHandle, stats
from tests.e2e.engines import close_output, only, prompt, require_vllm, run_engine, same_output

require_vllm()

pytestmark = pytest.mark.slow

CHUNK = 64          # tokens per chunk: two engine blocks of 32

# 4 full chunks can hit (never the last token), and an engine's own prefix cache of P1 holds
# exactly those 256 tokens too (8 blocks of 32), so it computes P1 as one that loaded them.
P1 = prompt(1, 280)
P2 = P1[:2 * CHUNK] + prompt(2, 150)       # shares exactly 2 chunks with P1
P3 = prompt(3, 200)                        # 3 chunks, 6 blocks: 192 tokens either way


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e")
    procs = Procs(base)
    model1 = build_tiny_llama(base / "model1", seed=0)
    model2 = build_tiny_llama(base / "model2", seed=1)
    run_dir = Path(tempfile.mkdtemp(prefix="lmkv-", dir="/tmp"))
    sidecar = SidecarHandle(procs, run_dir, ("--chunk-tokens", str(CHUNK), "--lease-timeout", "15s",
                                             "--heartbeat-interval", "1s", "--host-pool-size", "128MiB"))
    sidecar.start()
    lmkv = {"lmkv.endpoint": sidecar.endpoint}
    out: dict[str, Any] = {"sidecar": sidecar}
    try:
        spec = {"model": model1, "max_tokens": 8}
        out["ref"] = run_engine(procs, {**spec, "lmkv": None, "turns": [[{"prompt_token_ids": p}] for p in (P1, P2, P3)]}, "ref")
        # A's turns 3 and 4 ask P1 and P3 again, from its own prefix cache: what B and C compute
        # when they load those prompts' chunks from lmkv (the same bytes, the same cached length).
        out["A"] = run_engine(procs, {**spec, "lmkv": lmkv, "turns": [[{"prompt_token_ids": p}]
                                                                      for p in (P1, P3, P1, P3)]}, "A")
        out["after_A"] = stats(sidecar)
        # B also keeps vLLM's stats (as a server does) and logs them every step, on stderr.
        out["B"] = run_engine(procs, {**spec, "lmkv": lmkv, "log_stats": True,
                                      "turns": [[{"prompt_token_ids": P2}], [{"prompt_token_ids": P1}]]}, "B",
                              VLLM_LOG_STATS_INTERVAL="0.001", VLLM_LOGGING_STREAM="ext://sys.stderr")
        out["B_log"] = "".join(p.read_text(errors="replace") for p in base.glob("*-B.log"))
        out["after_B"] = stats(sidecar)
        sidecar.kill(signal.SIGKILL)
        sidecar.restart()
        out["C"] = run_engine(procs, {**spec, "lmkv": lmkv, "turns": [[{"prompt_token_ids": P3}]]}, "C")
        out["after_C"] = stats(sidecar)
        out["other_model"] = run_engine(procs, {"model": model2, "max_tokens": 8, "lmkv": lmkv,
                                                "turns": [[{"prompt_token_ids": P1}]]}, "other-model")
        out["after_other"] = stats(sidecar)
        nowhere = {"lmkv.endpoint": f"ipc://{tempfile.mkdtemp(prefix='lmkv-none-')}/control.sock"}
        out["no_sidecar"] = run_engine(procs, {**spec, "lmkv": nowhere, "turns": [[{"prompt_token_ids": P1}],
                                                                                 [{"prompt_token_ids": P2}]]},
                                       "no-sidecar")
        yield out
    finally:
        sidecar.close()
        procs.stop_all()


def test_engines_with_and_without_lmkv_run_on_the_same_threads(world: dict[str, Any]) -> None:
    """The outputs compared below (and their timings) come from the same number of threads."""
    threads = {name: world[name]["omp_threads"] for name in ("ref", "A", "B", "C", "no_sidecar")}
    assert len(set(threads.values())) == 1, threads


def test_first_engine_stores_its_prompts(world: dict[str, Any]) -> None:
    s = world["after_A"]
    assert s["stores"] == len(P1) // CHUNK + len(P3) // CHUNK
    assert close_output(only(world["A"], 0), only(world["ref"], 0))


def test_second_engine_reuses_the_first_engines_kv(world: dict[str, Any]) -> None:
    b_p1 = only(world["B"], 1)
    assert b_p1["num_cached_tokens"] == (len(P1) - 1) // CHUNK * CHUNK
    assert same_output(b_p1, only(world["A"], 2))  # A from its own prefix cache of P1
    assert close_output(b_p1, only(world["ref"], 0))


def test_partial_prefix_hits_exactly_the_shared_chunks(world: dict[str, Any]) -> None:
    b_p2 = only(world["B"], 0)      # B's first request: nothing local, all hits come from lmkv
    assert b_p2["num_cached_tokens"] == 2 * CHUNK
    # The engine without a sidecar had the same 2 chunks in its own prefix cache for P2
    # (computed with P1, as A computed the chunks B loaded); same_output checks the count.
    assert same_output(b_p2, only(world["no_sidecar"], 1))
    assert close_output(b_p2, only(world["ref"], 1))
    assert world["after_B"]["hit_chunks"] - world["after_A"]["hit_chunks"] >= 2 + 2


def test_connector_reports_its_stats_to_vllm(world: dict[str, Any]) -> None:
    """B's connector stats reach vLLM's Prometheus series (vllm:lmkv_*) and its periodic
    "KV Transfer metrics" log line, and equal what B did: turn 1 (P2, nothing local) loads
    the 2 chunks P2 shares with P1; turn 2 (P1) has those 2 locally and loads the rest."""
    m = world["B"]["lmkv_metrics"]
    p1_chunks = (len(P1) - 1) // CHUNK
    assert m["vllm:lmkv_lookups"] == 2
    assert m["vllm:lmkv_hit_tokens"] == 2 * CHUNK + p1_chunks * CHUNK
    assert m["vllm:lmkv_loaded_tokens"] == 2 * CHUNK + (p1_chunks - 2) * CHUNK
    assert m["vllm:lmkv_loaded_tokens"] == sum(o["num_cached_tokens"] for t in world["B"]["turns"]
                                               for o in t["outputs"]) - 2 * CHUNK  # minus turn 2's local hit
    assert m["vllm:lmkv_load_chunks"] == p1_chunks and m["vllm:lmkv_load_failures"] == 0
    assert m["vllm:lmkv_load_seconds_count"] == 2
    assert "KV Transfer metrics: lookups=" in world["B_log"] and "loaded_tokens=" in world["B_log"]


def test_warm_restart_between_engines_still_hits(world: dict[str, Any]) -> None:
    c = only(world["C"], 0)
    assert world["after_C"]["boot_id"] != world["after_B"]["boot_id"]
    assert c["num_cached_tokens"] == (len(P3) - 1) // CHUNK * CHUNK
    assert same_output(c, only(world["A"], 3))  # A from its own prefix cache of P3
    assert close_output(c, only(world["ref"], 2))


def test_other_model_never_shares(world: dict[str, Any]) -> None:
    o = only(world["other_model"], 0)
    assert o["num_cached_tokens"] == 0
    assert world["after_other"]["hit_chunks"] == world["after_C"]["hit_chunks"]
    assert not close_output(o, only(world["ref"], 0))  # really another model


def test_no_sidecar_means_plain_recompute_in_bounded_time(world: dict[str, Any]) -> None:
    n = only(world["no_sidecar"], 0)
    assert n["num_cached_tokens"] == 0
    assert same_output(n, only(world["A"], 0))
    assert close_output(n, only(world["ref"], 0))
    assert world["no_sidecar"]["turns"][0]["wall_s"] < world["ref"]["turns"][0]["wall_s"] + 5.0
