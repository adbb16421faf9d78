"""bench/serve.py's pure parts: its workload keeps prefixes stable, its summaries and ratios.

No engine runs here (the CI-sized run is ``python bench/serve.py --quick`` in .ci/run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="bench/serve.py's client: pip install -e '.[bench]'")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from serving import summary  # noqa: E402
from serving.client import Record  # noqa: E402
from serving.model import build_tokenizer, vocabulary  # noqa: E402
from serving.workload import ChatShape, Chats, arrivals, unique_prompts  # noqa: E402

SHAPE = ChatShape(users=2, rounds=3, system_tokens=40, history_tokens=30, question_tokens=5, answer_tokens=4, qps=1.0)


def test_a_round_starts_with_the_previous_prompt_and_answer_token_for_token(tmp_path: Path) -> None:
    """What prefix caching and both connectors key on: round r's prompt tokens begin with
    round r-1's prompt and answer tokens, through the chat template and the tokenizer."""
    transformers = pytest.importorskip("transformers")
    build_tokenizer(tmp_path, 512, 4096)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chats = Chats(SHAPE, 512, salt=1)
    prev: list[int] = []
    for r in range(SHAPE.rounds):
        messages = chats.messages(0)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert ids[:len(prev)] == prev
        assert abs(len(ids) - SHAPE.prompt_tokens(r)) <= 2
        answer = " ".join(vocabulary(512)[100 + r + k] for k in range(SHAPE.answer_tokens))
        chats.answer(0, messages, answer)
        prev = ids + tok(answer, add_special_tokens=False)["input_ids"]
    assert Chats(SHAPE, 512, salt=1).messages(1) == Chats(SHAPE, 512, salt=1).messages(1)  # the same for every system
    assert Chats(SHAPE, 512, salt=2).messages(1) != Chats(SHAPE, 512, salt=1).messages(1)  # scenarios share nothing


def test_unique_prompts_and_arrivals_are_fixed_by_the_seed() -> None:
    prompts = unique_prompts(4, 50, 512)
    assert len({p[0]["content"].split()[0] for p in prompts}) == 4 and prompts == unique_prompts(4, 50, 512)
    times = arrivals(200, 2.0, seed=1)
    assert times == arrivals(200, 2.0, seed=1) and times[0] == 0.0 and times == sorted(times)
    assert 70 < times[-1] < 130  # Poisson at 2/s: about 100 s for 200 arrivals


def _rec(user: int, ttft: float, tokens: list[int], error: str | None = None) -> Record:
    return Record(user, 0, 0, 0.0, send_s=float(user), ttft_s=ttft, e2e_s=ttft + 1.0, itl_s=[0.02, 0.04],
                  prompt_tokens=100, cached_tokens=50, completion_tokens=2, token_ids=tokens, error=error)


def test_summaries_count_failures_and_compare_answers() -> None:
    records = [_rec(0, 0.1, [1, 2]), _rec(1, 0.3, [3, 4]), _rec(2, 0.2, [5, 6], error="HTTP 500: boom")]
    line = summary.summarize(records, planned=4)
    assert (line["requests"], line["failed"], line["not_sent"]) == (2, 1, 1)
    assert line["ttft_p50_ms"] == 200.0 and line["itl_p50_ms"] == 30.0 and line["cached_frac"] == 0.5
    assert line["req_per_s"] == round(2 / 2.3, 4) and line["errors"] == ["HTTP 500: boom"]
    base = [_rec(0, 0.5, [1, 2]), _rec(1, 0.5, [3, 9]), _rec(2, 0.5, [5, 6])]
    base[1].cached_tokens = 0  # a different computation: its difference is reported, not judged
    assert summary.answers_against(records, base) == {"answers_compared": 2, "answers_differ": 1,
                                                      "answers_same_computation": 1,
                                                      "answers_differ_same_computation": 0}


def test_ratios_say_how_many_times_better_lmkv_is() -> None:
    lines = {"lmkv": {"ttft_p50_ms": 100.0, "ttft_p99_ms": 500.0, "req_per_s": 0.3, "server_cpu_s_per_req": 0.01},
             "none": {"ttft_p50_ms": 450.0, "ttft_p99_ms": 500.0, "req_per_s": 0.3},
             "lmcache": {"ttft_p50_ms": 120.0, "ttft_p99_ms": 600.0, "req_per_s": 0.33, "server_cpu_s_per_req": 0.06}}
    got = {(r["metric"], r["against"]): (r["ratio"], r["met"]) for r in summary.ratio_lines("1", lines)}
    assert got == {("ttft_p50_ms", "none"): (4.5, True), ("ttft_p50_ms", "lmcache"): (1.2, False),
                   ("ttft_p99_ms", "none"): (1.0, False),  # "lower than": a tie is not lower
                   ("ttft_p99_ms", "lmcache"): (1.2, True), ("req_per_s", "none"): (1.0, True),
                   ("req_per_s", "lmcache"): (0.909, False), ("server_cpu_s_per_req", "lmcache"): (6.0, True)}
    assert summary.ratio_lines("1", {"lmkv": lines["lmkv"]}) == []  # nothing to compare against
