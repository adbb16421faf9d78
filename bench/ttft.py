"""Time to first token across vLLM instances, with and without lmkv (real vLLM CPU engines).

Workload: for each context length, a fresh conversation (random tokens, so nothing is
cached anywhere beforehand) whose turn 1 runs on instance A and turn 2 (turn 1's prompt +
answer + a new user message) on instance B, as a load balancer would spread a chat. With
lmkv, A and B share one sidecar; without, B must recompute everything (engine Y, same
engine and turns, no lmkv). vLLM's own prefix caching is on in every engine. Also tried:
vLLM's native CPU offloading (``kv_offloading_size``) for the same workload; on the CPU
build of vLLM it refuses to start, and the JSON line says so.

One JSON line per context length:
  {"bench":"ttft","context_tokens":…,"cached_tokens":…,"ttft_no_lmkv_s":…,"ttft_lmkv_s":…,
   "speedup":…,"identical":…,"tokens_identical":…,"max_logprob_diff":…,
   "identical_to_own_prefix_cache":…,"own_prefix_cache_tokens":…,…}

``identical*`` compare B with the full recompute (Y); ``identical_to_own_prefix_cache``
compares B bit for bit with A answering the same turn 2 from vLLM's own prefix cache of the
same number of tokens, B got from lmkv (the same computation, ``lmkv_mp.demo.oracle``): the
check of lmkv's bytes, and the exit status. It is false when the two did not cache the same
number of tokens in each call, or B got nothing from lmkv.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from lmkv_mp.demo.engine_run import EngineProcess, engine_env, start_sidecar  # noqa: E402
from lmkv_mp.demo.oracle import judge, same_tokens  # noqa: E402
from lmkv_mp.demo.tiny_model import build_tiny_llama  # noqa: E402


def native_offloading(model: str, work: Path, env: dict[str, str]) -> dict[str, str]:
    """Try vLLM's own CPU offloading on this build; report what happened."""
    code = ("from vllm import LLM\n"
            f"LLM(model={model!r}, skip_tokenizer_init=True, block_size=32, enforce_eager=True, "
            "max_model_len=2048, kv_cache_memory_bytes=256<<20, kv_offloading_size=1)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if r.returncode == 0:
        return {"status": "started"}
    lines = [ln for ln in r.stderr.splitlines() if "Error" in ln or "Exception" in ln]
    return {"status": "unsupported", "error": (lines[-1] if lines else r.stderr[-300:]).strip()[:300]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,2048,4096")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small model and contexts (CI-sized)")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.hidden, args.layers = "1024", 256, 4
    contexts = [int(c) for c in args.contexts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lmkv-ttft-"))
    heads = args.hidden // 32  # head_dim 32: vLLM CPU computes bit-identically with and without a cached prefix
    model = build_tiny_llama(work / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                             num_kv_heads=max(1, heads // 4), head_dim=32, vocab_size=512, max_position=16384)
    run_dir = work / "run"
    sidecar = start_sidecar(run_dir, "1GiB")
    env = engine_env()
    top = max(contexts) + args.user_tokens + args.answer_tokens + 64
    spec = {"model": model, "max_model_len": top + 64, "kv_cache_bytes": 1 << 30, "warmup_tokens": top,
            "max_num_batched_tokens": top + 64}
    lmkv = {"lmkv.endpoint": f"ipc://{run_dir}/control.sock"}
    engines = {}
    rc = 0
    try:
        for name, extra in (("A", lmkv), ("B", lmkv), ("Y", None)):
            engines[name] = EngineProcess(name, {**spec, "lmkv": extra}, work, env)
        for e in engines.values():
            e.wait_ready()
        rng = random.Random(0)
        for ctx in contexts:
            turn1 = [rng.randrange(3, 500) for _ in range(ctx)]
            first = engines["A"].ask(turn1, args.answer_tokens)
            turn2 = turn1 + first["token_ids"] + [rng.randrange(3, 500) for _ in range(args.user_tokens)]
            with_lmkv = engines["B"].ask(turn2, args.answer_tokens)
            without = engines["Y"].ask(turn2, args.answer_tokens)
            # The check of lmkv's bytes: A asks turn 2 too, hitting vLLM's own prefix cache of
            # its turn 1, the same prefix B got from lmkv, so A computes exactly what B does.
            # Against the full recompute (Y), a different computation, only tokens and the
            # largest logprob difference are reported (oracle.py says why).
            own = engines["A"].ask(turn2, args.answer_tokens)
            v = judge(with_lmkv, own, without)
            exact = v.identical and with_lmkv["num_cached_tokens"] > 0
            emit({"bench": "ttft", "context_tokens": len(turn2), "cached_tokens": with_lmkv["num_cached_tokens"],
                  "ttft_no_lmkv_s": round(without["ttft_s"], 4), "ttft_lmkv_s": round(with_lmkv["ttft_s"], 4),
                  "speedup": round(without["ttft_s"] / with_lmkv["ttft_s"], 2), "identical": v.other_identical,
                  "tokens_identical": v.other_same_tokens,
                  "max_logprob_diff": round(v.other_max_logprob_diff, 5), "identical_to_own_prefix_cache": exact,
                  "own_prefix_cache_tokens": own["num_cached_tokens"],
                  "own_prefix_cache_tokens_identical_to_recompute": same_tokens(own, without),
                  "model": {"hidden": args.hidden, "layers": args.layers, "heads": heads},
                  "machine": machine()})
            rc |= 0 if exact else 1
    except Exception:
        traceback.print_exc()
        rc = 1
    finally:
        for e in engines.values():
            e.stop()
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(30)
    emit({"bench": "ttft", "system": "vllm-native-offloading", **native_offloading(model, work, env)})
    shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
