"""End to end, the requests and models beyond plain prompts on a dense model (issue #15):
two LoRA adapters on the same prompt, prompt embeddings, and a model with sliding-window
layers (a tiny random Gemma 2). Real vLLM (CPU) engines in their own processes, one real
sidecar.

The oracle ("ref") is an engine with the connector configured but no sidecar behind it, so
it is configured as the engines it is compared with, and every comparison is between the
same computations (STYLE.md 15): a full compute against a full compute, and a load of N
cached tokens against ref reusing N tokens from its own prefix cache (it first runs the
prompt's first N tokens, which then sit in its cache as whole blocks)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from lmkv_mp.demo.tiny_model import build_lora_adapter, build_tiny_gemma2, build_tiny_llama
from tests.conftest import Procs, stats
from tests.e2e.engines import nowhere, only, prompt, require_vllm, run_engine, same_output, started_sidecar

require_vllm()

pytestmark = pytest.mark.slow

CHUNK = 64
P = prompt(31, 300)            # 4 chunks can hit (never the last token)
HIT = 4 * CHUNK


def turn(tokens: list[int], lora: list[Any] | None = None) -> list[dict[str, Any]]:
    return [{"prompt_token_ids": tokens, **({"lora": lora} if lora else {})}]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e-requests")
    procs = Procs(base)
    llama = build_tiny_llama(base / "llama", seed=0)
    a1 = ["a1", 1, build_lora_adapter(base / "a1", llama, seed=1)]
    a2 = ["a2", 2, build_lora_adapter(base / "a2", llama, seed=2)]
    gemma = build_tiny_gemma2(base / "gemma", sliding_window=128, seed=0)
    sidecar = started_sidecar(procs, CHUNK)
    lmkv = {"lmkv.endpoint": sidecar.endpoint}
    none = nowhere()
    lora = {"model": llama, "max_tokens": 8, "lora": {"max_lora_rank": 8}}
    out: dict[str, Any] = {}
    try:
        out["lora_ref"] = run_engine(procs, {**lora, "lmkv": none, "turns": [
            turn(P, a2), turn(P[:HIT], a1), turn(P, a1)]}, "lora-ref")
        out["lora_A"] = run_engine(procs, {**lora, "lmkv": lmkv, "turns": [turn(P, a1)]}, "lora-A")
        out["after_lora_A"] = stats(sidecar)
        out["lora_B"] = run_engine(procs, {**lora, "lmkv": lmkv, "turns": [turn(P, a2), turn(P, a1)]}, "lora-B")
        out["before_embeds"] = stats(sidecar)
        out["embeds"] = run_engine(procs, {"model": llama, "max_tokens": 8, "lmkv": lmkv, "prompt_embeds": True,
                                           "turns": [[{"embeds": [5, 300, 64]}], turn(P)]}, "embeds")
        out["after_embeds"] = stats(sidecar)
        gem = {"model": gemma, "max_tokens": 8}
        out["gemma_ref"] = run_engine(procs, {**gem, "lmkv": none, "turns": [turn(P[:HIT]), turn(P)]}, "gemma-ref")
        out["gemma_A"] = run_engine(procs, {**gem, "lmkv": lmkv, "turns": [turn(P)]}, "gemma-A")
        out["gemma_B"] = run_engine(procs, {**gem, "lmkv": lmkv, "turns": [turn(P)]}, "gemma-B")
        out["end"] = stats(sidecar)
        yield out
    finally:
        sidecar.close()
        procs.stop_all()


def test_the_oracle_reused_exactly_what_lmkv_loads(world: dict[str, Any]) -> None:
    """Otherwise the bit-exact comparisons below compare different computations."""
    assert only(world["lora_ref"], 0)["num_cached_tokens"] == 0
    assert only(world["lora_ref"], 2)["num_cached_tokens"] == HIT
    assert only(world["gemma_ref"], 1)["num_cached_tokens"] == HIT


def test_another_adapters_kv_is_never_loaded(world: dict[str, Any]) -> None:
    """A stored P under adapter a1; B asks P under a2: nothing may come from cache, and B's
    answer is ref's under a2 to the bit (both computed P in full)."""
    assert world["after_lora_A"]["stores"] == len(P) // CHUNK
    b_a2 = only(world["lora_B"], 0)
    assert b_a2["num_cached_tokens"] == 0
    assert same_output(b_a2, only(world["lora_ref"], 0))


def test_the_same_adapter_loads_its_own_kv(world: dict[str, Any]) -> None:
    b_a1 = only(world["lora_B"], 1)
    assert b_a1["num_cached_tokens"] == HIT
    assert same_output(b_a1, only(world["lora_ref"], 2))
    # The adapters' answers differ: the comparison above could tell them apart.
    assert b_a1["token_ids"] != only(world["lora_B"], 0)["token_ids"]


def test_a_prompt_given_as_embeddings_runs_and_the_engine_goes_on(world: dict[str, Any]) -> None:
    """It used to raise TypeError in get_num_new_matched_tokens, killing the engine core."""
    embeds, after = only(world["embeds"], 0), only(world["embeds"], 1)
    assert len(embeds["token_ids"]) == 8 and embeds["num_cached_tokens"] == 0
    assert len(after["token_ids"]) == 8
    # The connector goes on working on that engine: the token prompt after it is stored,
    # and the embeddings were not (no token ids to key them by).
    assert world["after_embeds"]["stores"] - world["before_embeds"]["stores"] == len(P) // CHUNK


def test_a_sliding_window_model_shares_kv_between_instances(world: dict[str, Any]) -> None:
    """Gemma 2 alternates 128-token sliding-window and full-attention layers; on CPU vLLM
    allocates every block of both, so B loads A's chunks and answers as ref does after
    reusing the same 256 tokens from its own prefix cache."""
    b = only(world["gemma_B"], 0)
    assert b["num_cached_tokens"] == HIT
    assert same_output(b, only(world["gemma_ref"], 1))
    assert only(world["gemma_A"], 0)["num_cached_tokens"] == 0
