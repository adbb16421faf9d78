"""What bench/serve.py sends: multi-round chats after LMCache's ``multi_round_qa``, and
prompts that share nothing, each request issued at Poisson arrival times.

A chat user has the shared system prompt, a history of their own (LMCache's "user
history": the first user message) and one new question per round; every answer is
appended to the conversation, so round r's prompt starts with round r-1's prompt and
answer token for token. Texts come from a seeded RNG: every system gets the same system
prompt, histories and questions; only answers (greedy, so normally equal) depend on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from serving.model import text


@dataclass(frozen=True, slots=True)
class ChatShape:
    """U users x R rounds; token counts are words of the word-level vocabulary."""

    users: int
    rounds: int
    system_tokens: int
    history_tokens: int
    question_tokens: int
    answer_tokens: int
    qps: float
    seed: int = 0

    def prompt_tokens(self, round_: int) -> int:
        """About how long round ``round_``'s prompt is (the template adds 2 tokens a turn)."""
        return (self.system_tokens + self.history_tokens + 6 + round_ * (self.answer_tokens + 4)
                + (round_ + 1) * self.question_tokens)

    def working_set_tokens(self) -> int:
        """The KV every user's conversation holds at its last round, the system prompt once."""
        last = self.prompt_tokens(self.rounds - 1) + self.answer_tokens
        return self.system_tokens + self.users * (last - self.system_tokens)

    def requests(self) -> int:
        return self.users * self.rounds


class Chats:
    """The users' conversations; :meth:`messages` of a user's next round, :meth:`answer` to record it."""

    def __init__(self, shape: ChatShape, vocab: int, salt: int = 0) -> None:
        rng = random.Random(f"{shape.seed}:{salt}")
        self.shape = shape
        system = text(rng, shape.system_tokens, vocab)
        self.histories = [[{"role": "system", "content": system}] for _ in range(shape.users)]
        self.firsts = [text(rng, shape.history_tokens, vocab) for _ in range(shape.users)]
        self.questions = [[text(rng, shape.question_tokens, vocab) for _ in range(shape.rounds)]
                          for _ in range(shape.users)]
        self.done = [0] * shape.users

    def messages(self, user: int) -> list[dict[str, str]]:
        r = self.done[user]
        q = self.questions[user][r]
        return [*self.histories[user], {"role": "user", "content": f"{self.firsts[user]} {q}" if r == 0 else q}]

    def answer(self, user: int, messages: list[dict[str, str]], answer: str) -> None:
        self.histories[user] = [*messages, {"role": "assistant", "content": answer}]
        self.done[user] += 1


def unique_prompts(n: int, tokens: int, vocab: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` one-message chats of ``tokens`` random words: no two share a cached block."""
    rng = random.Random(f"{seed}:unique")
    return [[{"role": "user", "content": text(rng, tokens, vocab)}] for _ in range(n)]


def arrivals(n: int, qps: float, seed: int) -> list[float]:
    """``n`` Poisson arrival times (s from the start) at ``qps``, the same for every system."""
    rng = random.Random(f"{seed}:arrivals")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(qps)
    return out


def describe(shape: ChatShape) -> dict[str, Any]:
    return {"users": shape.users, "rounds": shape.rounds, "system_tokens": shape.system_tokens,
            "history_tokens": shape.history_tokens, "question_tokens": shape.question_tokens,
            "answer_tokens": shape.answer_tokens, "qps": shape.qps, "seed": shape.seed,
            "working_set_tokens": shape.working_set_tokens()}
