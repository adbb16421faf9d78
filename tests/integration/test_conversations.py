"""A conversation's answers are cached too, and vLLM's kv_role is honoured (issue #18), on
the connector's scheduler half against a real sidecar. The end-to-end half is
tests/e2e/test_vllm_conversation.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import pytest

from lmkv_mp.config import ConfigError, load_client_config
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.wire.keys import HASH_BYTES, chain_hashes
from tests.conftest import SidecarHandle
from tests.integration.test_vllm_scheduler import BLOCK, BPC, CHUNK, TOKENS, namespaces, output, store_chunks

PROMPT = TOKENS[:3 * CHUNK + 10]                 # 3 full chunks
ANSWER = list(range(600, 600 + 2 * CHUNK + 5))   # the engine's output: 2 more full chunks


def side_with(sidecar: Callable[..., SidecarHandle], **kw: Any) -> tuple[SidecarHandle, SchedulerSide]:
    handle = sidecar()
    return handle, SchedulerSide(handle.client("scheduler"), namespaces(), CHUNK, BLOCK, **kw)


def converse(s: SchedulerSide, rid: str, prompt: list[int], answer: list[int], blocks: list[int]) -> list[Any]:
    """A request as vLLM runs it: looked up, its prompt scheduled in full, then one decode
    step per answer token (the token sampled in the step before is computed in this one,
    as vLLM's Request.all_token_ids grows). Every store job the plans carried, in order."""
    req = SimpleNamespace(request_id=rid, prompt_token_ids=prompt, cache_salt=None, all_token_ids=list(prompt))
    s.get_num_new_matched_tokens(req, 0)
    jobs = list(s.build_plan(output(new=[(rid, blocks, 0, len(prompt))])).stores)
    for i, token in enumerate(answer[:-1]):  # the last sampled token is never computed
        req.all_token_ids.append(token)
        jobs += s.build_plan(output(cached=[(rid, None, len(prompt) + i, 1)])).stores
    req.all_token_ids.append(answer[-1])
    return jobs


def test_each_chunk_of_the_answer_is_stored_once_in_the_step_that_completes_it(
        sidecar: Callable[..., SidecarHandle]) -> None:
    handle, s = side_with(sidecar)
    blocks = list(range(100, 100 + 12 * BPC))
    jobs = converse(s, "r", PROMPT, ANSWER, blocks)
    whole = chain_hashes(PROMPT + ANSWER, CHUNK, s.client.hello.hash_key)
    assert [len(j.hashes) // HASH_BYTES for j in jobs] == [3, 1, 1]   # the prompt's 3, then one per chunk
    assert b"".join(j.hashes for j in jobs) == whole[:5 * HASH_BYTES]  # the same chain, chunks 0..4
    assert [j.block_ids for j in jobs[1:]] == [blocks[3 * BPC:4 * BPC], blocks[4 * BPC:5 * BPC]]
    assert s.request_finished(SimpleNamespace(request_id="r")) is True  # blocks wait for the stores


def test_no_answer_store_when_turned_off(sidecar: Callable[..., SidecarHandle]) -> None:
    handle, s = side_with(sidecar, store_output=False)
    jobs = converse(s, "r", PROMPT, ANSWER, list(range(12 * BPC)))
    assert [len(j.hashes) // HASH_BYTES for j in jobs] == [3]


def test_a_consumer_never_stores_and_a_producer_never_loads(sidecar: Callable[..., SidecarHandle]) -> None:
    handle = sidecar()
    store_chunks(handle, TOKENS, 4)
    consumer = SchedulerSide(handle.client("scheduler"), namespaces(), CHUNK, BLOCK, stores=False)
    producer = SchedulerSide(handle.client("scheduler"), namespaces(), CHUNK, BLOCK, loads=False)
    req = SimpleNamespace(request_id="c", prompt_token_ids=TOKENS, cache_salt=None)
    assert consumer.get_num_new_matched_tokens(req, 0) == (4 * CHUNK, True)
    assert converse(consumer, "c2", PROMPT, ANSWER, list(range(12 * BPC))) == []
    assert producer.get_num_new_matched_tokens(SimpleNamespace(request_id="p", prompt_token_ids=TOKENS,
                                                               cache_salt=None), 0) == (0, False)
    assert converse(producer, "p2", PROMPT, ANSWER, list(range(12 * BPC)))


@pytest.mark.parametrize("value, want", [(None, True), ("off", False), ("on", True), (False, False)])
def test_store_output_setting(value: Any, want: bool) -> None:
    assert load_client_config(overrides={"store_output": value}, env={}).store_output is want


def test_a_bad_store_output_value_says_what_to_write() -> None:
    with pytest.raises(ConfigError, match="LMKV_STORE_OUTPUT.*on or off"):
        load_client_config(env={"LMKV_STORE_OUTPUT": "maybe"})
