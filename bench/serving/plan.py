"""bench/serve.py's sizes, chosen once (full and ``--quick``), and vLLM's own load generator.

The chat workload is LMCache's ``multi_round_qa`` example (10 users, 5 rounds, 1000-word
system prompt, 2000-word history, 100-word answers, 0.5 QPS) scaled to a 2-core machine
whose model prefills ~100 tokens/s per core: token counts divided by 4 (256 / 512 / 32),
users halved (5, one core per instance), rounds 4, and the same request rate per user
(0.05/s, so 0.25 QPS for 5 users). The no-reuse scenario sends prompts of the first
round's length at 0.5 QPS, about 3/4 of what one core serves (~1.5 s each, measured), so
that a cost per request shows in throughput as well as in TTFT. ``--quick`` is a smaller model and
fewer, shorter requests, and two instances per system instead of three (scenario 2's
small-cache instance is scenario 1's second instance): it checks that everything runs
(CI) within 4 minutes; its numbers are not judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.fleet import HERE, ApiServer, EngineShape
from serving.workload import ChatShape

VOCAB = 4096


def kv_bytes_per_token(hidden: int, layers: int) -> int:
    heads = hidden // 32
    return layers * 2 * max(1, heads // 4) * 32 * 2  # K and V, bf16, head size 32 (serving/model.py)


@dataclass
class Plan:
    hidden: int
    layers: int
    chat: ChatShape
    duration_s: float  # no request starts after this (s from a run's start)
    drain_s: float  # then the requests in flight get this long
    unique_n: int
    unique_tokens: int
    unique_qps: float
    bench_prompts: int
    bench_qps: float
    bench_prefix: int
    bench_suffix: int
    quick: bool = False
    vocab: int = VOCAB
    model: str = ""
    engine: EngineShape = field(init=False)
    max_model_len: int = field(init=False)
    small_kv_bytes: int = field(init=False)
    small_kv_frac: float = field(init=False)
    pool_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        per_token = kv_bytes_per_token(self.hidden, self.layers)
        longest = max(self.chat.prompt_tokens(self.chat.rounds - 1), self.unique_tokens,
                      self.bench_prefix + self.bench_suffix) + self.chat.answer_tokens
        self.max_model_len = -(-(longest + 64) // 32) * 32
        ws = self.chat.working_set_tokens()
        # Scenario 1's engines hold its whole working set twice over (the limit run needs it);
        # scenario 2's a quarter of it, but never less than one longest request (vLLM refuses to start).
        self.engine = EngineShape(self.model, self.max_model_len, max(2 * ws, 4 * self.max_model_len) * per_token)
        small = max(ws // 4, self.max_model_len + 64)  # vLLM keeps a block or two back
        self.small_kv_bytes, self.small_kv_frac = small * per_token, round(small / ws, 3)
        # lmkv's and LMCache's pools hold everything every scenario stores, with room to spare.
        stored = 2 * ws + self.unique_n * self.unique_tokens + self.bench_prompts * longest
        self.pool_bytes = max(512 << 20, 2 * stored * per_token)

    @property
    def model_desc(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.hidden // 32, "head_dim": 32,
                "vocab": self.vocab, "dtype": "bfloat16", "seed": 0, "max_model_len": self.max_model_len,
                "kv_bytes_per_token": kv_bytes_per_token(self.hidden, self.layers)}


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(hidden=256, layers=4, chat=ChatShape(users=3, rounds=3, system_tokens=256, history_tokens=256,
                                                         question_tokens=16, answer_tokens=8, qps=4.0),
                    duration_s=30, drain_s=60, unique_n=4, unique_tokens=512, unique_qps=4.0, bench_prompts=6,
                    bench_qps=4.0, bench_prefix=256, bench_suffix=64, quick=True)
    return Plan(hidden=1024, layers=8, chat=ChatShape(users=5, rounds=4, system_tokens=256, history_tokens=512,
                                                      question_tokens=32, answer_tokens=32, qps=0.25),
                duration_s=240, drain_s=240, unique_n=16, unique_tokens=800, unique_qps=0.5, bench_prompts=12,
                bench_qps=0.5, bench_prefix=512, bench_suffix=128)


def run_vllm_bench(plan: Plan, server: ApiServer, work: Path, system: str) -> dict[str, Any]:
    """``vllm bench serve --dataset-name prefix_repetition`` against ``server``; its line."""
    out = work / f"vllm-bench-{system}.json"
    cmd = [sys.executable, str(HERE / "launch.py"), "bench-serve", "--backend", "openai",
           "--base-url", server.url, "--endpoint", "/v1/completions", "--model", "tiny", "--tokenizer", plan.model,
           "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(plan.bench_prefix),
           "--prefix-repetition-suffix-len", str(plan.bench_suffix), "--prefix-repetition-num-prefixes", "2",
           "--prefix-repetition-output-len", str(plan.chat.answer_tokens), "--num-prompts", str(plan.bench_prompts),
           "--request-rate", str(plan.bench_qps), "--seed", "0", "--ignore-eos", "--temperature", "0",
           "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm",
           "--save-result", "--save-detailed", "--result-dir", str(work), "--result-filename", out.name]
    env = {"NO_PROXY": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=plan.duration_s + plan.drain_s,
                         env={**os.environ, **env}, check=False)
    line: dict[str, Any] = {"bench": "serve", "scenario": "bench", "system": system, "instances": 1,
                            "client": "vllm bench serve --dataset-name prefix_repetition"}
    if run.returncode or not out.exists():
        return {**line, "failed": plan.bench_prompts, "error": (run.stdout + run.stderr)[-800:]}
    r = json.loads(out.read_text())
    return {**line, "requests": r["completed"], "planned": plan.bench_prompts, "failed": r.get("failed", 0),
            "ttft_p50_ms": round(r["median_ttft_ms"], 1), "ttft_p90_ms": round(r["p90_ttft_ms"], 1),
            "ttft_p99_ms": round(r["p99_ttft_ms"], 1), "itl_p50_ms": round(r["median_itl_ms"], 1),
            "e2e_p50_ms": round(r["median_e2el_ms"], 1), "req_per_s": round(r["request_throughput"], 4),
            "out_tok_per_s": round(r["output_throughput"], 2),
            "ttft_ms": [round(x * 1e3, 1) for x in r.get("ttfts") or [] if x],
            "dataset": {"prefix_len": plan.bench_prefix, "suffix_len": plan.bench_suffix, "num_prefixes": 2,
                        "output_len": plan.chat.answer_tokens, "num_prompts": plan.bench_prompts,
                        "request_rate": plan.bench_qps}}
