"""The load generator: a streaming OpenAI chat client (httpx) at Poisson arrival times.

Each request is ``POST /v1/chat/completions`` with ``stream: true``, greedy sampling, a
fixed answer length (``ignore_eos``), ``return_token_ids`` (vLLM's extension, so answers are
compared token by token) and ``stream_options.include_usage`` (the last chunk's usage has
``prompt_tokens_details.cached_tokens`` with the server's ``--enable-prompt-tokens-details``).
Requests go round-robin over the instances' URLs, as a load balancer without prefix-aware
routing would spread them. Every loop is bounded: a fixed number of arrivals, a duration
after which no new request starts, and a per-request timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from serving.workload import Chats

REQUEST_TIMEOUT_S = 600.0  # the drain cancels sooner; this bounds a stuck connection


@dataclass
class Record:
    """One request as the client saw it; times in seconds from the run's start."""

    user: int
    round: int
    instance: int
    arrival_s: float
    send_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list, repr=False)


async def chat(http: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int, rec: Record,
               t0: float) -> str:
    """Stream one chat completion into ``rec``; the answer's text."""
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    parts: list[str] = []
    rec.send_s = time.monotonic() - t0
    last = None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic() - t0
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if not ids and not piece:
                        continue
                    if rec.ttft_s is None:
                        rec.ttft_s = now - rec.send_s
                    elif last is not None and ids:
                        rec.itl_s.extend([(now - last) / len(ids)] * len(ids))
                    last = now
                    rec.token_ids.extend(ids)
                    parts.append(piece)
                usage = chunk.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens", 0)
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        rec.e2e_s = time.monotonic() - t0 - rec.send_s
        if rec.completion_tokens != max_tokens:
            rec.error = f"{rec.completion_tokens} tokens instead of {max_tokens}"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    return "".join(parts)


def _client() -> httpx.AsyncClient:
    # Loopback only; trust_env=False so no proxy setting of the environment reroutes it.
    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0), trust_env=False,
                             limits=httpx.Limits(max_connections=64))


async def run_chats(urls: list[str], chats: Chats, times: list[float], max_tokens: int, duration_s: float,
                    drain_s: float) -> list[Record]:
    """One round of some user per arrival (the next user whose last answer is in; if none
    is, the arrival waits for one), instance ``i % len(urls)`` for the i-th request."""
    ready: asyncio.Queue[int] = asyncio.Queue()
    for u in range(chats.shape.users):
        ready.put_nowait(u)
    records: list[Record] = []
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()

    async def one(rec: Record, messages: list[dict[str, str]]) -> None:
        answer = await chat(http, urls[rec.instance], messages, max_tokens, rec, t0)
        if rec.error is None:
            chats.answer(rec.user, messages, answer)
            if chats.done[rec.user] < chats.shape.rounds:
                ready.put_nowait(rec.user)

    async with _client() as http:
        for i, t in enumerate(times):
            await asyncio.sleep(max(0.0, t - (time.monotonic() - t0)))
            left = duration_s - (time.monotonic() - t0)
            if left <= 0:
                break
            try:
                user = await asyncio.wait_for(ready.get(), left)
            except asyncio.TimeoutError:
                break
            rec = Record(user, chats.done[user], i % len(urls), t, messages=chats.messages(user))
            records.append(rec)
            tasks.append(asyncio.create_task(one(rec, rec.messages)))
        await _finish(tasks, records, drain_s)
    return records


async def run_prompts(urls: list[str], prompts: list[list[dict[str, str]]], times: list[float], max_tokens: int,
                      duration_s: float, drain_s: float,
                      keys: list[tuple[int, int]] | None = None) -> list[Record]:
    """Prompt i at arrival i (open loop), round-robin over ``urls``; its record is keyed
    (user, round) ``keys[i]``, else (i, 0)."""
    records: list[Record] = []
    tasks: list[asyncio.Task[str]] = []
    t0 = time.monotonic()
    async with _client() as http:
        for i, (t, messages) in enumerate(zip(times, prompts)):
            await asyncio.sleep(max(0.0, t - (time.monotonic() - t0)))
            if time.monotonic() - t0 > duration_s:
                break
            user, round_ = keys[i] if keys else (i, 0)
            rec = Record(user, round_, i % len(urls), t, messages=messages)
            records.append(rec)
            tasks.append(asyncio.create_task(chat(http, urls[rec.instance], messages, max_tokens, rec, t0)))
        await _finish(tasks, records, drain_s)
    return records


async def _finish(tasks: list[asyncio.Task[Any]], records: list[Record], drain_s: float) -> None:
    """Wait up to ``drain_s`` for the requests in flight, then cancel the rest (failed)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for rec in records:
        if rec.e2e_s is None and rec.error is None:
            rec.error = f"not answered within the run's {drain_s:.0f} s drain"
