"""What an answer from an engine with lmkv is compared with, and how (STYLE 15).

vLLM's CPU kernels are not batch-invariant on every CPU: a prompt computed after N cached
tokens can differ, first in the last bits of its logprobs and then in its tokens, from the
same prompt computed after another number of cached tokens or from scratch (seen on an
AVX2-only EPYC; not on the AVX-512 machines of this project). So:

- **The check of lmkv's bytes** is bit for bit (tokens and logprobs) against an engine that
  reused exactly as many cached prompt tokens, in every call of the answer, holding the same
  bytes: the same arithmetic on the same inputs. :func:`same_computation` is that premise as
  vLLM reports it (``num_cached_tokens``); a comparison whose premise fails is no verdict.
- **Against a different computation** (a full recompute, another cached length) only the
  tokens and the largest logprob difference are reported.

An answer is a dict as ``lmkv_mp.demo.engine_run`` writes it: ``token_ids``, ``logprobs``,
``num_cached_tokens`` and, from ``--serve``, ``answer_cached_tokens`` (the answer is a second
call, after the time-to-first-token one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

Answer = Mapping[str, Any]

CACHED_KEYS = ("num_cached_tokens", "answer_cached_tokens")


def cached_tokens(answer: Answer) -> tuple[int, ...]:
    """The prompt tokens each call of ``answer`` took from cache, as vLLM reported them."""
    return tuple(answer[k] for k in CACHED_KEYS if k in answer)


def same_computation(a: Answer, b: Answer) -> bool:
    """Whether ``a`` and ``b`` reused as many cached tokens in every call (the premise of a
    bit-exact comparison; that the cached bytes are alike is the caller's construction)."""
    return cached_tokens(a) == cached_tokens(b)


def same_tokens(a: Answer, b: Answer) -> bool:
    return list(a["token_ids"]) == list(b["token_ids"])


def bit_identical(a: Answer, b: Answer) -> bool:
    """The same tokens and the same logprobs, to the bit."""
    return same_tokens(a, b) and list(a["logprobs"]) == list(b["logprobs"])


def max_logprob_diff(a: Answer, b: Answer) -> float:
    """The largest difference between the logprobs of the same positions (inf if the answers
    have different lengths)."""
    if len(a["logprobs"]) != len(b["logprobs"]):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])), default=0.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One answer of an engine with lmkv, against the same computation without lmkv (the
    check of lmkv's bytes: :attr:`identical`) and against a different one (reported only)."""

    cached: tuple[int, ...]
    """What the engine with lmkv reused per call."""
    same_cached: tuple[int, ...]
    """What the same-computation engine reused per call; not ``cached``: no verdict."""
    identical: bool
    """Bit-identical to the same computation, and it was one."""
    other_cached: tuple[int, ...]
    other_same_tokens: bool
    other_identical: bool
    other_max_logprob_diff: float

    @property
    def same_computation(self) -> bool:
        return self.cached == self.same_cached


def judge(got: Answer, same: Answer, other: Answer) -> Verdict:
    """``got`` (with lmkv) against ``same`` (the same computation) and ``other`` (a full
    recompute or another cached length)."""
    return Verdict(cached=cached_tokens(got), same_cached=cached_tokens(same),
                   identical=same_computation(got, same) and bit_identical(got, same),
                   other_cached=cached_tokens(other), other_same_tokens=same_tokens(got, other),
                   other_identical=bit_identical(got, other), other_max_logprob_diff=max_logprob_diff(got, other))
