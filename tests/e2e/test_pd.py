"""End to end, prefill/decode disaggregation on one node (issue #18): a prefill instance
(kv_producer) and a decode instance (kv_consumer), two real vLLM OpenAI servers sharing one
sidecar, behind launch/pd_proxy.py, driven by a real HTTP client (the openai package). The
decode instance loads every full prompt chunk from the sidecar and computes none of them;
its answer has the tokens of an instance that computed everything itself. When the prefill
instance is dead, and then also the sidecar, the decode instance computes the prompt itself."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench.redisproc import free_port
from lmkv_mp.demo.tiny_model import add_word_tokenizer, build_tiny_llama, words
from tests.conftest import Procs, stats, wait_for
from tests.e2e.engines import REF_LOGPROB_TOLERANCE, prompt, require_vllm, started_sidecar
from tests.e2e.servers import Server, complete, kv_config

require_vllm()

pytestmark = pytest.mark.slow

CHUNK = 64
ROOT = Path(__file__).resolve().parents[2]


def close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["text"] == b["text"] and all(abs(x - y) <= REF_LOGPROB_TOLERANCE for x, y in zip(a["logprobs"], b["logprobs"]))


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("e2e-pd")
    procs = Procs(base)
    model = add_word_tokenizer(build_tiny_llama(base / "model", seed=0))
    sidecar = started_sidecar(procs, CHUNK)
    servers = {name: Server(procs, name, model, kv_config(sidecar.endpoint, role))
               for name, role in (("prefill", "kv_producer"), ("decode", "kv_consumer"))}
    port = free_port()
    proxy = procs.start([sys.executable, str(ROOT / "launch" / "pd_proxy.py"), "--prefill", servers["prefill"].url,
                         "--decode", servers["decode"].url, "--port", str(port), "--prefill-timeout", "120"],
                        "proxy", start_new_session=True)
    try:
        for s in servers.values():
            s.wait_ready()
        yield {"sidecar": sidecar, "procs": procs, "model": model, "proxy": f"http://127.0.0.1:{port}",
               "proxy_proc": proxy, **servers}
    finally:
        for s in servers.values():
            s.stop()
        sidecar.close()
        procs.stop_all()


def test_the_decode_instance_loads_every_full_prompt_chunk(pd: dict[str, Any]) -> None:
    p = prompt(51, 300)
    wait_for(lambda: _proxy_up(pd["proxy"]), 60, "the proxy")
    got = complete(pd["proxy"], pd["model"], words(p))
    full = (len(p) - 1) // CHUNK * CHUNK   # never the last token
    assert got["prompt_tokens"] == len(p) and got["cached_tokens"] == full
    s = stats(pd["sidecar"])
    assert s["stores"] == len(p) // CHUNK     # by the producer; the consumer stored nothing
    # Its tokens are those of an instance that computed the prompt itself (the producer, asked
    # directly: it never loads); different computations, so logprobs within the tolerance.
    alone = complete(pd["prefill"].url, pd["model"], words(p))
    assert close(got, alone), (got, alone)


def test_without_a_prefill_instance_the_decode_instance_computes_the_prompt(pd: dict[str, Any]) -> None:
    p = prompt(52, 300)
    pd["prefill"].kill()
    got = complete(pd["proxy"], pd["model"], words(p))
    assert got["cached_tokens"] == 0 and len(got["logprobs"]) == 8
    assert "failed" in pd["proxy_proc"].log.read_text()   # the proxy said why
    again = complete(pd["decode"].url, pd["model"], words(p))  # now from its own prefix cache
    assert close(got, again), (got, again)


def test_a_consumer_whose_sidecar_is_down_computes_the_prompt(pd: dict[str, Any]) -> None:
    pd["sidecar"].kill(signal.SIGKILL)
    p = prompt(54, 300)
    got = complete(pd["proxy"], pd["model"], words(p))
    assert got["cached_tokens"] == 0 and len(got["logprobs"]) == 8


def _proxy_up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
