"""End to end, a conversation spread over two instances (issue #18): instance A answers
turn 1 with a long answer; instance B gets turn 2 (turn 1's prompt, A's answer, a new
message) and loads the chunks that cover A's answer too, not only the prompt's. B's answer
is compared with ref reusing exactly as many tokens from its own prefix cache (STYLE.md 15)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from lmkv_mp.demo.tiny_model import build_tiny_llama
from tests.conftest import Procs, stats
from tests.e2e.engines import nowhere, only, prompt, require_vllm, run_engine, same_output, started_sidecar

require_vllm()

pytestmark = pytest.mark.slow

CHUNK = 64
TURN1 = prompt(41, 300)       # 4 full chunks
ANSWER_TOKENS = 200           # 300 + 200 tokens, KV for 499 of them: 7 full chunks


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e-chat")
    procs = Procs(base)
    model = build_tiny_llama(base / "model", seed=0)
    sidecar = started_sidecar(procs, CHUNK)
    lmkv = {"lmkv.endpoint": sidecar.endpoint}
    none = nowhere()
    out: dict[str, Any] = {}
    try:
        out["A"] = run_engine(procs, {"model": model, "lmkv": lmkv, "max_tokens": ANSWER_TOKENS,
                                      "turns": [[{"prompt_token_ids": TURN1}]]}, "A")
        out["after_A"] = stats(sidecar)
        turn2 = TURN1 + only(out["A"], 0)["token_ids"] + prompt(42, 50)
        out["turn2"] = turn2
        cached = (len(TURN1) + ANSWER_TOKENS - 1) // CHUNK * CHUNK
        out["cached"] = cached
        out["B"] = run_engine(procs, {"model": model, "lmkv": lmkv, "max_tokens": 8,
                                      "turns": [[{"prompt_token_ids": turn2}]]}, "B")
        out["ref"] = run_engine(procs, {"model": model, "lmkv": none, "max_tokens": 8, "turns": [
            [{"prompt_token_ids": turn2[:cached]}], [{"prompt_token_ids": turn2}]]}, "ref")
        yield out
    finally:
        sidecar.close()
        procs.stop_all()


def test_the_first_instance_stored_its_answer_once(chat: dict[str, Any]) -> None:
    assert len(only(chat["A"], 0)["token_ids"]) == ANSWER_TOKENS
    assert chat["after_A"]["stores"] == chat["cached"] // CHUNK   # 4 prompt chunks + 3 of the answer


def test_the_next_turn_on_another_instance_loads_the_answer(chat: dict[str, Any]) -> None:
    b = only(chat["B"], 0)
    assert b["num_cached_tokens"] == chat["cached"] > len(TURN1)
    assert only(chat["ref"], 1)["num_cached_tokens"] == chat["cached"]
    assert same_output(b, only(chat["ref"], 1))
