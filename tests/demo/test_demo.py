"""lmkv_mp/demo/demo.py without vLLM: the conversation, its table and its verdict on engines
that take tokens from cache as vLLM and lmkv do, and answer as vLLM's CPU kernels do on an
AVX2-only machine (the answer depends on how many prompt tokens came from cache)."""

from __future__ import annotations

from typing import Any

import pytest

from lmkv_mp.demo.demo import CHUNK_TOKENS, Layout, main, play, summary
from lmkv_mp.demo.engine_run import BLOCK_SIZE, CacheNamespace, Engine

SMALL = Layout(turns=4, system_tokens=16, user_tokens=240, answer_tokens=16)  # prompts of 256, 512, 768, 1024


class StandIn:
    """An :class:`Engine`: vLLM's prefix cache (whole blocks of what it computed, never the
    last prompt token, per ``cache_salt``) and, with ``lmkv``, the connector's shared store
    (whole chunks of prompt). Two calls per prompt, as ``engine_run.serve``. ``wrong`` shifts
    every answer that used a chunk from lmkv: what wrong bytes would do."""

    def __init__(self, name: str, lmkv: set[tuple[int, ...]] | None, wrong: bool = False) -> None:
        self.name = name
        self.lmkv = lmkv
        self.wrong = wrong
        self.blocks: set[tuple[str | None, tuple[int, ...]]] = set()

    @staticmethod
    def _longest(prompt: list[int], have: set[Any], step: int, salt: str | None = None) -> int:
        n = 0
        while n + step <= len(prompt) - 1 and (salt, tuple(prompt[:n + step])) in have:
            n += step
        return n

    def _cached(self, prompt: list[int], salt: str | None) -> tuple[int, bool]:
        local = self._longest(prompt, self.blocks, BLOCK_SIZE, salt)
        shared = self._longest(prompt, self.lmkv, CHUNK_TOKENS, salt) if self.lmkv is not None else 0
        return max(local, shared), shared > local

    def _computed(self, tokens: list[int], prompt_len: int, salt: str | None) -> None:
        self.blocks |= {(salt, tuple(tokens[:k])) for k in range(BLOCK_SIZE, len(tokens) + 1, BLOCK_SIZE)}
        if self.lmkv is not None:
            self.lmkv |= {(salt, tuple(tokens[:k])) for k in range(CHUNK_TOKENS, prompt_len + 1, CHUNK_TOKENS)}

    def ask(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> dict[str, Any]:
        cached, loaded = self._cached(prompt, cache_salt)
        self._computed(prompt, len(prompt), cache_salt)
        answer_cached, _ = self._cached(prompt, cache_salt)
        tokens = [(sum(prompt) + i) % 500 for i in range(max_tokens)]
        self._computed(prompt + tokens[:-1], len(prompt), cache_salt)
        shift = 1e-3 if self.wrong and loaded else 0.0
        logprobs = [-1.0 - cached * 1e-6 - answer_cached * 1e-9 - shift] * max_tokens
        return {"ttft_s": 0.1 if cached else 1.0, "num_cached_tokens": cached, "answer_cached_tokens": answer_cached,
                "token_ids": tokens, "logprobs": logprobs}


def engines(wrong: bool = False) -> dict[str, Engine]:
    """As the demo runs them: A and B share lmkv, one engine without it is X, Y and R."""
    shared: set[tuple[str | None, tuple[int, ...]]] = set()
    plain = StandIn("plain", None)
    return {"A": StandIn("A", shared), "B": StandIn("B", shared, wrong),
            **{n: CacheNamespace(n, plain) for n in ("X", "Y", "R")}}


def test_an_answer_equal_to_the_same_computation_passes_though_a_recompute_differs() -> None:
    """The AVX2 machine of issue 15: the old demo compared B with Y, which recomputed turn 2
    from scratch, and said NO; R reused exactly what B got from lmkv and agrees to the bit."""
    lines: list[str] = []
    turns = play(engines(), SMALL, out=lines.append)
    assert [t.verdict.cached[0] for t in turns] == [0, 256, 512, 768]
    assert all(t.verdict.same_computation and t.verdict.identical for t in turns)
    assert not turns[1].verdict.other_identical  # what the old oracle judged by
    assert turns[1].verdict.other_cached[0] == 0 and turns[1].verdict.other_max_logprob_diff > 0
    text, rc = summary(turns)
    assert rc == 0
    assert "answers identical with and without lmkv on every turn (vs R, the same computation): yes" in text
    assert "the same tokens on 4 of 4 turns" in text
    assert len(lines) == 2 + 4 and lines[2].split()[:4] == ["1", "A/X", "256", "0"]


def test_wrong_bytes_from_lmkv_fail() -> None:
    turns = play(engines(wrong=True), SMALL, out=lambda _: None)
    assert [t.verdict.identical for t in turns] == [True, False, True, False]
    text, rc = summary(turns)
    assert rc == 1 and "every turn (vs R, the same computation): NO" in text


def test_a_turn_r_cannot_compute_alike_is_no_verdict_and_fails() -> None:
    """Prompts off chunk boundaries (the old layout): on turn 2 B gets 1536 tokens from lmkv
    (6 chunks), while R holds 1664 in whole blocks."""
    old = Layout(turns=2, system_tokens=1536, user_tokens=128, answer_tokens=16)
    assert old.problem() is not None
    turns = play(engines(), old, out=lambda _: None)
    assert turns[1].verdict.cached[0] == 1536 and turns[1].verdict.same_cached[0] == 1664
    text, rc = summary(turns)
    assert rc == 1 and "turn 2: B took (1536, 1792) tokens from cache" in text and "no verdict" in text


@pytest.mark.parametrize("flags", [["--user-tokens", "128"], ["--system-tokens", "1536"],
                                   ["--answer-tokens", "48", "--user-tokens", "208"]])
def test_a_layout_r_cannot_match_is_refused_before_any_engine_starts(flags: list[str],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_the_default_layout_ends_every_prompt_on_a_chunk_boundary() -> None:
    assert Layout().problem() is None and SMALL.problem() is None


def test_cache_namespaces_of_one_engine_share_no_blocks() -> None:
    plain = StandIn("plain", None)
    x, r = CacheNamespace("X", plain), CacheNamespace("R", plain)
    prompt = list(range(3, 3 + 300))
    assert x.ask(prompt, 4)["num_cached_tokens"] == 0
    assert r.ask(prompt, 4)["num_cached_tokens"] == 0
    assert x.ask(prompt, 4)["num_cached_tokens"] == 288
    assert plain.ask(prompt, 4)["num_cached_tokens"] == 0  # no salt: a namespace of its own too
