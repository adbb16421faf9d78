"""The end-to-end demo: two vLLM instances share KV through one lmkv-sidecar.

``python -m lmkv_mp.demo`` builds a small random Llama on the spot, starts a sidecar and
four real vLLM (CPU) engines, each in its own process: instances A and B use lmkv, X and
Y are the same engines without it. A multi-turn conversation alternates between the
instances (turn 1 on A, turn 2 on B, ...), as a load balancer would spread a chat over a
fleet; X and Y replay the same turns. Each turn prints the prompt length, the tokens that
came from cache, the time to first token without and with lmkv, and whether the answers
are identical token for token.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import posix_ipc

from lmkv_mp.demo.engine_run import EngineProcess, engine_env, start_sidecar
from lmkv_mp.memory import shm_name_for


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmkv_mp.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1536, help="length of the shared conversation start")
    ap.add_argument("--user-tokens", type=int, default=128, help="new tokens per user turn")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, model)")
    args = ap.parse_args(argv)

    from lmkv_mp.demo.tiny_model import build_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="lmkv-demo-"))
    print(f"work dir {work}", flush=True)
    # head_dim 32: vLLM's CPU attention then computes a prompt bit-identically whether or not
    # a prefix came from cache (at head_dim 64 it does not, even with its own prefix cache),
    # so "identical" below can be checked exactly.
    model = build_tiny_llama(work / "model", hidden_size=512, num_layers=8, num_heads=16, num_kv_heads=4,
                             head_dim=32, vocab_size=512, max_position=8192)
    run_dir = work / "run"
    sidecar = start_sidecar(run_dir, "512MiB")
    env = engine_env()
    lmkv = {"lmkv.endpoint": f"ipc://{run_dir}/control.sock"}
    spec = {"model": model, "max_model_len": 8192, "kv_cache_bytes": 512 << 20,
            "warmup_tokens": args.system_tokens + args.turns * (args.user_tokens + args.answer_tokens)}
    engines: dict[str, EngineProcess] = {}
    try:
        print("starting the sidecar and 4 vLLM engines (A, B with lmkv; X, Y without) ...", flush=True)
        for name, extra in (("A", lmkv), ("B", lmkv), ("X", None), ("Y", None)):
            engines[name] = EngineProcess(name, {**spec, "lmkv": extra}, work, env)
        for e in engines.values():
            e.wait_ready()
        rng = random.Random(0)
        history = [rng.randrange(3, 500) for _ in range(args.system_tokens)]
        header = (f"{'turn':>4} {'instance':>8} {'prompt':>7} {'cached':>7} {'TTFT no lmkv':>13} "
                  f"{'TTFT lmkv':>10} {'speedup':>8} {'identical':>9}")
        print(header)
        print("-" * len(header))
        all_same = True
        for turn in range(args.turns):
            prompt = history + [rng.randrange(3, 500) for _ in range(args.user_tokens)]
            with_lmkv, without = (engines["A"], engines["X"]) if turn % 2 == 0 else (engines["B"], engines["Y"])
            got = with_lmkv.ask(prompt, args.answer_tokens)
            ref = without.ask(prompt, args.answer_tokens)
            same = got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]
            all_same &= same
            print(f"{turn + 1:>4} {with_lmkv.name + '/' + without.name:>8} {len(prompt):>7} "
                  f"{got['num_cached_tokens']:>7} {ref['ttft_s'] * 1000:>11.0f}ms {got['ttft_s'] * 1000:>8.0f}ms "
                  f"{ref['ttft_s'] / got['ttft_s']:>7.1f}x {'yes' if same else 'NO':>9}", flush=True)
            history = prompt + got["token_ids"]
        print(f"\nanswers identical with and without lmkv on every turn: {'yes' if all_same else 'NO'}")
        print("instances A and B never share a process: every cached token of theirs came through "
              "the sidecar's shared memory.")
        stats = subprocess.run([sys.executable, "-c", "from lmkv_mp.cli import stats_main; stats_main()"],
                               env={**os.environ, "LMKV_RUN_DIR": str(run_dir)}, capture_output=True, text=True)
        print("\n" + stats.stdout)
        return 0 if all_same else 1
    finally:
        for e in engines.values():
            e.stop()
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        try:
            posix_ipc.unlink_shared_memory(shm_name_for(run_dir))
        except posix_ipc.ExistentialError:
            pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
