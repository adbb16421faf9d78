"""Never wrong KV for every request vLLM serves (issue #15), without an engine: what enters
a request's keys (LoRA adapters, multimodal inputs, a reset epoch), what is declined
(prompt embeddings, pipeline and context parallelism, split kernel blocks), and the hooks
that keep vLLM from waiting on a rank that declined or from copying into released memory.
The end-to-end halves are in tests/e2e/test_vllm_requests.py."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from lmkv_mp.integration.plan import LoadJob, StepPlan, StoreJob
from lmkv_mp.integration.request_keys import AdapterDigests, request_key
from lmkv_mp.integration.vllm_scheduler import SchedulerSide
from lmkv_mp.integration.vllm_worker import DeclinedRank
from lmkv_mp.wire.keys import HASH_BYTES, chain_hashes
from tests.conftest import SidecarHandle, stats
from tests.integration.test_vllm_scheduler import BLOCK, CHUNK, TOKENS, namespaces, output, store_chunks
from tests.integration.test_vllm_worker import NS, cache, plan, worker

KEY = bytes(32)


def adapter(tmp_path: Path, name: str, weights: bytes) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(weights)
    return str(d)


def req(rid: str = "r", tokens: list[int] = TOKENS, **kw: Any) -> Any:
    return SimpleNamespace(**{"request_id": rid, "prompt_token_ids": tokens, "cache_salt": None, **kw})


def lora(name: str, path: str) -> Any:
    return SimpleNamespace(lora_name=name, lora_int_id=1, lora_path=path)


def hashes(r: Any, epoch: bytes = b"", digests: AdapterDigests | None = None) -> bytes:
    key = request_key(r, CHUNK, epoch, digests or AdapterDigests())
    assert not key.declined, key.declined
    return chain_hashes(r.prompt_token_ids, CHUNK, KEY, key.salt, extras=key.extras)


# -- what enters the key --------------------------------------------------------------------


def test_a_plain_or_salted_request_keeps_the_keys_it_always_had() -> None:
    assert hashes(req()) == chain_hashes(TOKENS, CHUNK, KEY)
    assert hashes(req(cache_salt="t1")) == chain_hashes(TOKENS, CHUNK, KEY, b"t1")


def test_the_same_prompt_under_two_adapters_never_shares_a_key(tmp_path: Path) -> None:
    a1, a2 = adapter(tmp_path, "a1", b"\x01" * 64), adapter(tmp_path, "a2", b"\x02" * 64)
    base = hashes(req())
    one, two = hashes(req(lora_request=lora("a1", a1))), hashes(req(lora_request=lora("a2", a2)))
    chunks = [{x[i:i + HASH_BYTES] for x in (base, one, two)} for i in range(0, len(base), HASH_BYTES)]
    assert all(len(c) == 3 for c in chunks)  # every chunk differs, the first one included
    # The same name at another path with other weights is another adapter too.
    assert hashes(req(lora_request=lora("a1", a2))) != one
    assert hashes(req(lora_request=lora("a1", a1))) == one


def test_an_adapter_whose_weights_changed_in_place_gets_new_keys(tmp_path: Path) -> None:
    path = adapter(tmp_path, "a", b"\x01" * 64)
    digests = AdapterDigests()
    before = hashes(req(lora_request=lora("a", path)), digests=digests)
    (Path(path) / "adapter_model.safetensors").write_bytes(b"\x03" * 65)
    assert hashes(req(lora_request=lora("a", path)), digests=digests) != before


def test_an_adapter_that_cannot_be_read_here_is_declined(tmp_path: Path) -> None:
    key = request_key(req(lora_request=lora("hub", "org/some-adapter")), CHUNK, b"", AdapterDigests())
    assert "LoRA adapter 'hub'" in key.declined


def test_no_cache_salt_spells_an_adapter_or_an_epoch(tmp_path: Path) -> None:
    """A structured seed starts with 0xff, which no UTF-8 string does."""
    key = request_key(req(lora_request=lora("a", adapter(tmp_path, "a", b"x"))), CHUNK, b"", AdapterDigests())
    assert key.salt[:1] == b"\xff"
    with pytest.raises(UnicodeDecodeError):
        key.salt.decode()


def mm_feature(identifier: str | None, offset: int, length: int) -> Any:
    """vLLM's own MultiModalFeatureSpec and PlaceholderRange."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier, mm_position=PlaceholderRange(
        offset=offset, length=length))


def test_an_image_enters_the_chunks_its_placeholders_cover_and_every_later_one() -> None:
    pytest.importorskip("vllm")
    # Placeholder tokens 150..249 (chunks 2 and 3 of 64): the same token ids for any image.
    cat, dog = (hashes(req(mm_features=[mm_feature(h, 150, 100)])) for h in ("cat-hash", "dog-hash"))
    plain = hashes(req())
    n = len(plain) // HASH_BYTES
    chunk = [lambda x, i=i: x[i * HASH_BYTES:(i + 1) * HASH_BYTES] for i in range(n)]
    assert [chunk[i](cat) == chunk[i](dog) for i in range(n)] == [True, True, False, False, False]
    assert chunk[1](cat) == chunk[1](plain) and chunk[2](cat) != chunk[2](plain)
    # The same image at another offset is another prompt.
    assert hashes(req(mm_features=[mm_feature("cat-hash", 151, 100)])) != cat


def test_a_multimodal_input_without_a_content_hash_is_declined() -> None:
    pytest.importorskip("vllm")
    key = request_key(req(mm_features=[mm_feature(None, 10, 20)]), CHUNK, b"", AdapterDigests())
    assert key.declined == "a multimodal input without a content hash"


# -- the scheduler half ---------------------------------------------------------------------


@pytest.fixture
def side(sidecar: Callable[..., SidecarHandle]) -> tuple[SidecarHandle, SchedulerSide]:
    handle = sidecar()
    return handle, SchedulerSide(handle.client("scheduler"), namespaces(), CHUNK, BLOCK)


def test_prompt_embeddings_are_declined_without_an_error(side: tuple, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM hands no token ids with prompt embeddings: the lookup used to raise TypeError
    inside get_num_new_matched_tokens, which kills the engine core."""
    handle, s = side
    embeds = SimpleNamespace(request_id="e", prompt_token_ids=None, prompt_embeds=torch.zeros(300, 8),
                             cache_salt=None)
    with caplog.at_level(logging.INFO, logger="lmkv"):
        assert s.get_num_new_matched_tokens(embeds, 0) == (0, False)
        assert s.get_num_new_matched_tokens(req("e2", prompt_token_ids=None, prompt_embeds=1), 0) == (0, False)
    assert sum("prompt embeddings" in r.message for r in caplog.records) == 1  # one line per engine
    plan = s.build_plan(output(new=[("e", list(range(10)), 0, 300)]))
    assert plan.stores == [] and plan.loads == []
    assert s.request_finished(embeds) is False
    assert stats(handle)["lookups"] == 0


def test_a_request_that_skips_the_prefix_cache_is_stored_but_never_loaded(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 4)
    r = req("s", skip_reading_prefix_cache=True)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    assert s.build_plan(output(new=[("s", list(range(10)), 0, len(TOKENS))])).stores


def test_after_reset_nothing_stored_before_is_hit(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 4)
    assert s.get_num_new_matched_tokens(req("before"), 0) == (4 * CHUNK, True)
    assert s.reset() is True
    assert s.get_num_new_matched_tokens(req("after"), 0) == (0, False)
    # What this engine stores from now on is found again, under the new epoch.
    (job,) = s.build_plan(output(new=[("after", list(range(10)), 0, len(TOKENS))])).stores
    assert job.hashes != chain_hashes(TOKENS, CHUNK, s.client.hello.hash_key)[:len(job.hashes)]


def test_loaded_tokens_are_reported_by_the_tier_that_holds_them(side: tuple) -> None:
    handle, s = side
    store_chunks(handle, TOKENS, 3)
    r = req("h")
    ext, _ = s.get_num_new_matched_tokens(r, BLOCK)
    s.update_state_after_alloc(r, list(range(20)), ext)
    assert s.device_tokens(r) == 0  # a CPU sidecar: every chunk comes from the host pool


# -- engine-wide declines -------------------------------------------------------------------


def config(spec_method: str | None = None, **parallel: int) -> Any:
    return SimpleNamespace(parallel_config=SimpleNamespace(**parallel),
                           speculative_config=SimpleNamespace(method=spec_method) if spec_method else None)


def kv_config(*specs: Any) -> Any:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])


def spec(cls: str, **kw: Any) -> Any:
    return type(cls, (), {"num_kv_heads": 2, "head_size": 32, **kw})()


@pytest.mark.parametrize("parallel, reason", [
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2"),
    ({"decode_context_parallel_size": 2}, "decode_context_parallel_size=2"),
    ({"prefill_context_parallel_size": 2}, "prefill_context_parallel_size=2"),
])
def test_pipeline_and_context_parallelism_are_declined(parallel: dict[str, int], reason: str) -> None:
    from lmkv_mp.integration.vllm import LMKVConnector

    assert reason in LMKVConnector._check_supported(config(**parallel), kv_config(spec("FullAttentionSpec")))
    assert LMKVConnector._check_supported(config(tensor_parallel_size=2), kv_config(spec("FullAttentionSpec"))) == ""


@pytest.mark.parametrize("method, served", [("eagle", False), ("eagle3", False), ("mtp", False),
                                            ("draft_model", False), ("ngram", True), ("suffix", True)])
def test_speculative_decoding_with_draft_layers_is_declined(method: str, served: bool) -> None:
    from lmkv_mp.integration.vllm import LMKVConnector

    got = LMKVConnector._check_supported(config(method), kv_config(spec("FullAttentionSpec")))
    assert (got == "") is served, got


@pytest.mark.parametrize("specs, served", [
    ((spec("FullAttentionSpec"),), True),
    ((spec("FullAttentionSpec", sliding_window=128),), True),   # vLLM allocates every block
    ((spec("MLAAttentionSpec"),), True),
    ((spec("SlidingWindowSpec", sliding_window=128),), False),  # frees blocks out of the window
    ((spec("FullAttentionSpec", attention_chunk_size=64),), False),
    ((spec("FullAttentionSpec"), spec("SlidingWindowSpec", sliding_window=128)), False),  # hybrid manager on
    ((type("MambaSpec", (), {})(),), False),
])
def test_which_kv_cache_specs_are_served(specs: tuple, served: bool) -> None:
    pytest.importorskip("vllm")
    from lmkv_mp.integration.vllm import LMKVConnector

    assert (LMKVConnector._check_supported(config(), kv_config(*specs)) == "") is served


# -- the worker half ------------------------------------------------------------------------


def test_a_rank_that_declined_answers_every_planned_job() -> None:
    """Otherwise a load the scheduler planned (chunks another engine stored) waits in
    WAITING_FOR_REMOTE_KVS forever, and a request with stores never frees its blocks."""
    rank = DeclinedRank("cannot read the KV cache layout")
    rank.submit_loads(plan(loads=[LoadJob("l", b"boot", [[0]], [], [4, 5], 0)]))
    rank.submit_stores(plan(stores=[StoreJob("s", b"\x00" * 16, [1, 2])]))
    assert rank.finished(set()) == (None, {"l"})
    assert rank.load_errors() == {4, 5}
    assert rank.finished({"s"}) == ({"s"}, None)
    assert rank.take_stats() == {"load_jobs": 1, "load_failures": 1}


def test_split_kernel_blocks_are_read_as_runs_of_kernel_blocks() -> None:
    """An attention backend whose kernel block (16) is below vLLM's block (64) gets a cache
    of num_blocks x 4 kernel blocks: block b is kernel blocks 4b..4b+3, and the layout in the
    namespace tells it from an unsplit cache."""
    pytest.importorskip("vllm")
    from lmkv_mp.integration.vllm import LMKVConnector

    conn = LMKVConnector.__new__(LMKVConnector)
    conn._layer_names, conn._block_size = ["l0"], 64
    conn._kv_cache_config = SimpleNamespace(num_blocks=10)
    split = torch.arange(40 * 16 * 2 * 32, dtype=torch.int16).view(40, 16, 2, 32)
    paged = conn._read_layout({"l0": split})
    assert not isinstance(paged, str), paged
    slot = torch.empty(paged.chunk_bytes(1), dtype=torch.uint8)
    paged.gather([3], slot)
    assert torch.equal(slot.view(torch.int16), split[12:16].flatten())
    unsplit = conn._read_layout({"l0": torch.zeros(10, 64, 2, 32, dtype=torch.int16)})
    assert unsplit.layout_fingerprint() != paged.layout_fingerprint()
    assert isinstance(conn._read_layout({"l0": torch.zeros(40, 20, 2, 32)}), str)  # two candidate dims


def test_while_paused_for_sleep_no_copy_touches_the_cache(sidecar: Callable[..., SidecarHandle]) -> None:
    handle = sidecar()
    paged = cache(5)
    w = worker(handle, paged)
    before = [p.clone() for p in paged.parts]
    key = handle.client("scheduler")
    assert key.connect()
    hashes_ = chain_hashes(list(range(CHUNK)), CHUNK, key.hello.hash_key)
    w.pause("the KV cache is released (sleep mode)")
    w.submit_stores(plan(stores=[StoreJob("s", hashes_, [0, 1])]))
    w.submit_loads(plan(loads=[LoadJob("l", key.hello.boot_id, [[0]], [], [2, 3], 0)]))
    w.wait_for_inflight()
    assert w.finished({"s"}) == ({"s"}, {"l"}) and w.load_errors() == {2, 3}
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(paged.parts, before))
    assert stats(handle)["stores"] == 0
    w.resume()
    w.submit_stores(plan(stores=[StoreJob("s2", hashes_, [0, 1])]))
    w.wait_for_inflight()
    assert key.lookup([NS], hashes_).hits == 1
    w.close()


# -- the ranks' layouts ---------------------------------------------------------------------


def bare_connector() -> Any:
    from lmkv_mp.integration.vllm import LMKVConnector

    conn = LMKVConnector.__new__(LMKVConnector)
    conn._spec = type("FullAttentionSpec", (), {"num_kv_heads": 2, "head_size": 32, "dtype": "bf16",
                                                "page_size_bytes": 8192})()
    conn._layer_names, conn._block_size = ["l0", "l1"], BLOCK
    return conn


def test_ranks_whose_slots_hold_other_bytes_get_other_namespaces() -> None:
    """Two attention backends can lay out the same model's KV cache differently (K/V first
    or blocks first) with the same config: the ranks' layouts are in the namespace."""
    pytest.importorskip("vllm")
    conn = bare_connector()
    cfg = SimpleNamespace(model_config=SimpleNamespace(model="m", revision=None), speculative_config=None)
    kv = SimpleNamespace(kv_cache_layout="NHD")
    ids = [[ns.id for ns in conn._namespaces(cfg, kv, CHUNK, 2, "", layouts)]
           for layouts in (["a", "a"], ["b", "b"], ["a", "a"])]
    assert ids[0] == ids[2] and not set(ids[0]) & set(ids[1])


def test_a_rank_told_to_use_keys_made_for_another_layout_copies_nothing(sidecar: Callable[..., SidecarHandle]) -> None:
    pytest.importorskip("vllm")
    from lmkv_mp.integration.vllm import LMKVConnectorMetadata

    handle = sidecar()
    conn = bare_connector()
    paged = cache(6)
    conn._worker, conn._tp_rank, conn._layout = worker(handle, paged), 0, paged.layout_fingerprint()
    job = LoadJob("l", b"boot", [[0]], [], [2, 3], 0)
    conn._connector_metadata = LMKVConnectorMetadata(StepPlan(CHUNK, BLOCK, [NS], ["t"], [job],
                                                              rank_layouts=[conn._layout]))
    assert conn._plan() is not None and not isinstance(conn._worker, DeclinedRank)
    conn._connector_metadata = LMKVConnectorMetadata(StepPlan(CHUNK, BLOCK, [NS], ["t"], [job],
                                                              rank_layouts=["another layout"]))
    switched = conn._plan()
    conn._worker.submit_loads(switched)
    assert isinstance(conn._worker, DeclinedRank)
    assert conn._worker.finished(set()) == (None, {"l"}) and conn._worker.load_errors() == {2, 3}
