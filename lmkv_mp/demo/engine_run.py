"""Run one real vLLM engine over a script of prompts and write what it produced as JSON.

Used by the end-to-end tests, the demo and ``bench/ttft.py``: each engine runs in its own
process (``python -m lmkv_mp.demo.engine_run SPEC.json OUT.json``), exactly as a
user's vLLM would, with or without the lmkv connector. SPEC::

    {"model": "/path", "lmkv": {"lmkv.endpoint": "ipc://..."} | null, "tp": 1,
     "max_model_len": 4096, "block_size": 32, "max_tokens": 8, "log_stats": false,
     "turns": [[{"prompt_token_ids": [...], "cache_salt": "..."}, ...], ...]}

Optional: ``"lora": {"max_lora_rank": 8}`` enables LoRA, and a prompt's ``"lora": [name,
id, path]`` runs it under that adapter; ``"prompt_embeds": true`` enables prompt
embeddings, and a prompt ``{"embeds": [seed, length, hidden]}`` is random embeddings.

Every turn is one ``generate`` call; its outputs (token ids, logprobs, num_cached_tokens)
and its wall time are recorded. With ``log_stats`` vLLM keeps its stats (as a server
does), and the connector's ``vllm:lmkv_*`` series are recorded too. With ``--serve`` instead of OUT.json the engine stays up
and answers prompts from stdin (see :func:`serve`), for drivers that build each turn from
the previous answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from lmkv_mp.config.common import DEFAULT_CHUNK_TOKENS


SERVE_MARK = "@lmkv "
"""Prefix of the serve protocol's stdout lines (vLLM prints to stdout too)."""

BLOCK_SIZE = 32
"""vLLM's block size where a spec names none (vLLM's CPU attention needs a multiple of 32)."""


def make_llm(spec: dict[str, Any]) -> Any:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = dict(model=spec["model"], skip_tokenizer_init=True, block_size=spec.get("block_size", BLOCK_SIZE),
                              enforce_eager=True, max_model_len=spec.get("max_model_len", 2048),
                              max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192),
                              max_num_seqs=8, seed=0, enable_prefix_caching=spec.get("prefix_caching", True),
                              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 << 20),
                              tensor_parallel_size=spec.get("tp", 1), disable_log_stats=not spec.get("log_stats"))
    if spec.get("tp", 1) > 1:
        kw["distributed_executor_backend"] = "mp"
    if spec.get("lora"):
        kw.update(enable_lora=True, max_loras=2, max_lora_rank=spec["lora"].get("max_lora_rank", 8))
    if spec.get("prompt_embeds"):
        kw["enable_prompt_embeds"] = True
    if spec.get("lmkv") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMKVConnector", kv_connector_module_path="lmkv_mp.integration.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=spec["lmkv"])
    llm = LLM(**kw)
    # The first long prompt an engine sees pays several seconds of one-off warm-up (measured:
    # 8.4 s, then 0.5 s for the next prompt of the same length); keep it out of timings. The
    # salt keeps the warm-up prompt out of every cache the measured prompts could hit.
    n = spec.get("warmup_tokens", 3)
    warm = [3 + (i * 7919) % 491 for i in range(n)]
    llm.generate([{"prompt_token_ids": warm, "cache_salt": "lmkv-warmup"}],
                 SamplingParams(temperature=0.0, max_tokens=2, logprobs=1, ignore_eos=True), use_tqdm=False)
    return llm


def generate(llm: Any, prompts: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One ``generate`` call: its wall time and, per prompt, what a test compares."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    inputs, loras = zip(*(_engine_input(p) for p in prompts))
    t = time.perf_counter()
    outs = llm.generate(list(inputs), sp, use_tqdm=False,
                        **({"lora_request": list(loras)} if any(loras) else {}))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "outputs": [{
        "prompt_len": len(o.prompt_token_ids) if o.prompt_token_ids is not None else None,
        "num_cached_tokens": o.num_cached_tokens,
        "token_ids": list(o.outputs[0].token_ids),
        "logprobs": [d[tid].logprob for tid, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
    } for o in outs]}


def _engine_input(prompt: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A spec prompt as vLLM's input and its LoRARequest (or None)."""
    prompt = dict(prompt)
    lora = prompt.pop("lora", None)
    if "embeds" in prompt:
        import torch

        seed, length, hidden = prompt.pop("embeds")
        prompt["prompt_embeds"] = torch.randn(length, hidden, generator=torch.Generator().manual_seed(seed)).to(
            torch.bfloat16)
    if lora is None:
        return prompt, None
    from vllm.lora.request import LoRARequest

    return prompt, LoRARequest(lora[0], lora[1], lora[2])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = make_llm(spec)
    started = time.perf_counter()
    turns = [generate(llm, prompts, spec.get("max_tokens", 8)) for prompts in spec["turns"]]
    import torch

    # What the model ran on (in-process engines: this thread is the worker's), to compare runs.
    out: dict[str, Any] = {"start_s": started - t0, "turns": turns, "omp_threads": torch.get_num_threads(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if spec.get("log_stats"):
        out["lmkv_metrics"] = lmkv_metrics(llm)
    return out


def lmkv_metrics(llm: Any) -> dict[str, float]:
    """The connector's ``vllm:lmkv_*`` series from vLLM's registry, summed over label sets:
    counters by name, histograms as ``<name>_count``."""
    from vllm.v1.metrics.reader import Counter, Histogram

    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:lmkv_"):
            if isinstance(m, Counter):
                out[m.name] = out.get(m.name, 0) + m.value
            elif isinstance(m, Histogram):
                out[f"{m.name}_count"] = out.get(f"{m.name}_count", 0) + m.count
    return out


def serve(spec: dict[str, Any]) -> None:
    """Line protocol for interactive drivers (the demo): print ``{"ready": true}``, then for
    each stdin line ``{"prompt_token_ids": [...], "max_tokens": N}`` (and optionally
    ``"cache_salt": S``) print one line with the time to first token (a ``max_tokens=1``
    call) and the prompt tokens that call took from cache (``num_cached_tokens``), then the
    full greedy answer of a second call and what it took from cache (``answer_cached_tokens``:
    the first call's blocks, from vLLM's own prefix cache).
    :func:`lmkv_mp.demo.oracle.same_computation` compares both counts."""
    llm = make_llm(spec)
    print(SERVE_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prompt = [{k: req[k] for k in ("prompt_token_ids", "cache_salt") if k in req}]
        first = generate(llm, prompt, 1)
        (full,) = generate(llm, prompt, req.get("max_tokens", 16))["outputs"]
        print(SERVE_MARK + json.dumps({"ttft_s": first["wall_s"],
                                       "num_cached_tokens": first["outputs"][0]["num_cached_tokens"],
                                       "answer_cached_tokens": full["num_cached_tokens"],
                                       **{k: full[k] for k in ("token_ids", "logprobs")}}), flush=True)


def engine_env() -> dict[str, str]:
    """Environment for engine processes a driver starts: the CPU build, offline, engine core
    in-process, and none of the driver's LMKV_* settings (each spec names its endpoint)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_LOGGING_LEVEL="WARNING")
    return env


def start_sidecar(run_dir: Path, pool_size: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> subprocess.Popen:
    """A sidecar for a driver's engines on ``run_dir``, ``chunk_tokens`` per chunk whatever
    the environment says (a driver's prompts are laid out for it); its pool goes when it exits."""
    return subprocess.Popen([sys.executable, "-m", "lmkv_mp.cli", "--run-dir", str(run_dir), "--host-pool-size",
                             pool_size, "--chunk-tokens", str(chunk_tokens), "--metrics-port", "0", "--unlink-on-exit",
                             "--log-level", "warning"])


class Engine(Protocol):
    """What a driver asks of an engine: :class:`EngineProcess`, or a stand-in that answers as
    vLLM would (the demo's tests)."""

    name: str

    def ask(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> dict[str, Any]:
        """The :func:`serve` reply to one prompt: ``ttft_s``, ``num_cached_tokens``,
        ``answer_cached_tokens``, ``token_ids``, ``logprobs``. ``cache_salt`` is vLLM's: only
        a prompt with the same salt can hit its blocks."""
        ...


@dataclass(frozen=True, slots=True)
class CacheNamespace:
    """An :class:`Engine` under a ``cache_salt`` of its own: to the prefix cache, another
    engine of the same kind (the salt changes which blocks a prompt can hit, never what is
    computed), so one process can stand for several."""

    name: str
    engine: Engine

    def ask(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> dict[str, Any]:
        return self.engine.ask(prompt, max_tokens, self.name if cache_salt is None else f"{self.name}/{cache_salt}")


class EngineProcess:
    """The driver's handle on one engine process in ``--serve`` mode (its own process group,
    so :meth:`stop` also ends any worker processes vLLM started)."""

    def __init__(self, name: str, spec: dict[str, Any], work: Path, env: dict[str, str]) -> None:
        self.name = name
        spec_path = work / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        self.log = open(work / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmkv_mp.demo.engine_run", str(spec_path), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, start_new_session=True)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(SERVE_MARK):
                return json.loads(line[len(SERVE_MARK):])
        raise RuntimeError(f"engine {self.name} exited; see {self.log.name}")

    def wait_ready(self) -> None:
        while not self._read().get("ready"):
            pass

    def ask(self, prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        salt = {"cache_salt": cache_salt} if cache_salt is not None else {}
        stdin.write(json.dumps({"prompt_token_ids": prompt, "max_tokens": max_tokens, **salt}) + "\n")
        stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    if sys.argv[2] == "--serve":
        serve(spec)
        sys.stdout.flush()
        os._exit(0)
    result = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    # vLLM's teardown can hang on engine threads; the result is written, leave now.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
