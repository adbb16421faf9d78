"""lmkv_mp/demo/oracle.py: bit for bit only against the same computation."""

from __future__ import annotations

import math

from lmkv_mp.demo.oracle import bit_identical, cached_tokens, judge, max_logprob_diff, same_computation


def answer(cached: int, logprobs: list[float], tokens: list[int] | None = None, answer_cached: int = 1760) -> dict:
    return {"num_cached_tokens": cached, "answer_cached_tokens": answer_cached,
            "token_ids": tokens or [7, 8, 9], "logprobs": logprobs}


def test_equal_to_the_same_computation_is_identical_whatever_a_recompute_says() -> None:
    """The AVX2 case: B's answer after 1536 tokens from lmkv is R's after the same 1536 from its
    own prefix cache, and differs from a full recompute in its logprobs (and a token)."""
    got = answer(1536, [-1.0, -2.0, -3.0])
    recompute = answer(0, [-1.0, -2.25, -3.0], tokens=[7, 8, 10])
    v = judge(got, dict(got), recompute)
    assert v.same_computation and v.identical
    assert not v.other_identical and not v.other_same_tokens and v.other_max_logprob_diff == 0.25
    assert v.other_cached == (0, 1760)


def test_a_bit_off_the_same_computation_is_not_identical() -> None:
    v = judge(answer(1536, [-1.0, -2.0]), answer(1536, [-1.0, -2.0000001]), answer(0, [-1.0, -2.0]))
    assert v.same_computation and not v.identical
    assert v.other_identical  # by luck of the kernels: reported, never the verdict


def test_another_cached_length_is_no_verdict_even_when_the_bits_agree() -> None:
    got = answer(1536, [-1.0])
    for same in (answer(1664, [-1.0]), answer(1536, [-1.0], answer_cached=1792)):
        assert not same_computation(got, same)
        v = judge(got, same, same)
        assert not v.same_computation and not v.identical
    assert bit_identical(got, answer(1664, [-1.0]))


def test_cached_tokens_reads_the_counts_an_answer_has() -> None:
    assert cached_tokens(answer(256, [])) == (256, 1760)
    assert cached_tokens({"num_cached_tokens": 64, "token_ids": [], "logprobs": []}) == (64,)


def test_max_logprob_diff() -> None:
    assert max_logprob_diff(answer(0, [-1.0, -2.0]), answer(0, [-1.5, -2.0])) == 0.5
    assert max_logprob_diff(answer(0, []), answer(0, [])) == 0.0
    assert math.isinf(max_logprob_diff(answer(0, [-1.0]), answer(0, [-1.0, -2.0])))
