"""Real vLLM OpenAI-compatible servers for the end-to-end tests, each in its own process
group, reaped on every exit path; and a real HTTP client for them (the ``openai`` package)."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.redisproc import free_port
from tests.conftest import Procs, wait_for
from tests.e2e.engines import kill_group

SERVER_START_TIMEOUT = 600.0
ROOT = Path(__file__).resolve().parents[2]


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT),
               VLLM_LOGGING_LEVEL="INFO")
    env.update(extra)
    return env


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on a free loopback port."""

    def __init__(self, procs: Procs, name: str, model: str, kv_transfer: dict[str, Any] | None,
                 *args: str) -> None:
        self.name, self.model, self.port = name, model, free_port()
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-model-len", "2048", "--block-size", "32", "--enforce-eager",
                "--seed", "0", "--enable-prompt-tokens-details", "--max-num-seqs", "8", *args]
        if kv_transfer is not None:
            argv += ["--kv-transfer-config", json.dumps(kv_transfer)]
        self.proc = procs.start(argv, name, env=server_env(), start_new_session=True)
        self.log = procs.log_path(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server {self.name} exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text(errors='replace')[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(up, timeout, f"server {self.name} to answer /health", interval=0.5)

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.stop()


def kv_config(endpoint: str, role: str = "kv_both") -> dict[str, Any]:
    return {"kv_connector": "LMKVConnector", "kv_connector_module_path": "lmkv_mp.integration.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"lmkv.endpoint": endpoint}}


def complete(base_url: str, model: str, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    """One streamed greedy completion through the ``openai`` client: its tokens' text, their
    logprobs and the usage (prompt and cached tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=300, max_retries=0)
    text, logprobs, usage = [], [], None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           logprobs=1, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            text.append(choice.text)
            if choice.logprobs and choice.logprobs.token_logprobs:
                logprobs += choice.logprobs.token_logprobs
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {"text": "".join(text), "logprobs": logprobs, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": cached or 0}
