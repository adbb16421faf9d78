"""Run one real vLLM engine over a script of prompts and write what it produced as JSON.

Used by the end-to-end tests, the demo and ``bench/ttft.py``: each engine runs in its own
process (``python -m lmkv_mp.integration.engine_run SPEC.json OUT.json``), exactly as a
user's vLLM would, with or without the lmkv connector. SPEC::

    {"model": "/path", "lmkv": {"lmkv.endpoint": "ipc://..."} | null, "tp": 1,
     "max_model_len": 4096, "block_size": 32, "max_tokens": 8,
     "turns": [[{"prompt_token_ids": [...], "cache_salt": "..."}, ...], ...]}

Every turn is one ``generate`` call; its outputs (token ids, logprobs, num_cached_tokens)
and its wall time are recorded. ``ttft`` mode (``"max_tokens": 1``) makes the wall time
of a one-prompt turn the time to first token.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = dict(model=spec["model"], skip_tokenizer_init=True, block_size=spec.get("block_size", 32),
                              enforce_eager=True, max_model_len=spec.get("max_model_len", 2048),
                              max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192),
                              max_num_seqs=8, seed=0, enable_prefix_caching=spec.get("prefix_caching", True),
                              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 << 20),
                              tensor_parallel_size=spec.get("tp", 1))
    if spec.get("tp", 1) > 1:
        kw["distributed_executor_backend"] = "mp"
    if spec.get("lmkv") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMKVConnector", kv_connector_module_path="lmkv_mp.integration.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=spec["lmkv"])
    llm = LLM(**kw)
    started = time.perf_counter()
    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=1, ignore_eos=True)
    if spec.get("warmup", True):  # the first generate pays one-off warm-up; keep it out of timings
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1), use_tqdm=False)
    turns = []
    for prompts in spec["turns"]:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        turns.append({"wall_s": wall, "outputs": [{
            "prompt_len": len(o.prompt_token_ids),
            "num_cached_tokens": o.num_cached_tokens,
            "token_ids": list(o.outputs[0].token_ids),
            "logprobs": [d[tid].logprob for tid, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
        } for o in outs]})
    return {"start_s": started - t0, "turns": turns}


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    result = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    # vLLM's teardown can hang on engine threads; the result is written, leave now.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
