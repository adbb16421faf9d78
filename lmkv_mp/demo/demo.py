"""The end-to-end demo: two vLLM instances share KV through one lmkv-sidecar.

``python -m lmkv_mp.demo`` builds a small random Llama on the spot, starts a sidecar and
three real vLLM (CPU) engines, each in its own process: instances A and B use lmkv; the
third is the same engine without it, and plays X, Y and R, each in a prefix-cache namespace
of its own (a ``cache_salt``: to vLLM's prefix cache, three engines). A multi-turn
conversation alternates between A and B (turn 1 on A, turn 2 on B, ...), as a load balancer
would spread a chat over a fleet. Each turn prints the prompt length, the tokens A or B
took from cache, the time to first token without lmkv (X for A, Y for B) and with it, and
two comparisons of the answer:

- **with R, the same computation: bit for bit.** R answers every turn itself, as one vLLM
  serving the whole chat would, so its own prefix cache holds every earlier turn computed
  exactly as A and B computed it, and it reuses from there exactly the tokens A or B got
  from cache (checked on every turn in each call through vLLM's ``num_cached_tokens``).
  This is the check of lmkv's bytes, and the exit status.
- **with X or Y, plain vLLM: tokens and the largest logprob difference, reported only.**
  X and Y are A and B without lmkv; their own prefix cache holds other lengths (nothing, on
  a turn the other instance had), and vLLM's CPU kernels need not compute a prompt after
  another cached length to the same bits (on AVX2-only CPUs they do not; see oracle.py).

R reuses exactly what A and B got only if every prompt ends on a chunk boundary (lmkv
stores whole chunks of prompt, vLLM caches whole blocks of all it computed): the default
layout does, and others are refused.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import posix_ipc

from lmkv_mp.config.common import DEFAULT_CHUNK_TOKENS
from lmkv_mp.demo.engine_run import BLOCK_SIZE, CacheNamespace, Engine, EngineProcess, engine_env, start_sidecar
from lmkv_mp.demo.oracle import Verdict, judge
from lmkv_mp.memory import shm_name_for

CHUNK_TOKENS = DEFAULT_CHUNK_TOKENS


@dataclass(frozen=True, slots=True)
class Layout:
    """The conversation: a shared start, then per turn a user message and an answer."""

    turns: int = 4
    system_tokens: int = 1296
    user_tokens: int = 240
    answer_tokens: int = 16

    def problem(self, chunk_tokens: int = CHUNK_TOKENS, block_size: int = BLOCK_SIZE) -> str | None:
        """Why R could not reuse exactly what A and B got from cache, or None. Turn k's prompt
        is turn k-1's prompt, its answer and a user message; lmkv stores a prompt's whole
        chunks, vLLM caches whole blocks of what it computed (the prompt and all but the last
        answer token)."""
        if (self.system_tokens + self.user_tokens) % chunk_tokens or \
                (self.answer_tokens + self.user_tokens) % chunk_tokens:
            return (f"--system-tokens + --user-tokens and --answer-tokens + --user-tokens must be multiples of "
                    f"{chunk_tokens} (the sidecar's chunk size), so that every prompt ends on a chunk boundary")
        if not 1 <= self.answer_tokens <= block_size:
            return f"--answer-tokens must be 1..{block_size} (vLLM's block size), so that no answer fills a block"
        return None


@dataclass(frozen=True, slots=True)
class Turn:
    number: int
    with_lmkv: str
    plain: str
    prompt_tokens: int
    ttft_lmkv_s: float
    ttft_plain_s: float
    verdict: Verdict


HEADER = "\n".join(line.rstrip() for line in (
    f"{'':27} {'time to first token':^24}   {'vs R: the same':^20}   {'vs X/Y: plain vLLM':^27}",
    f"{'':27} {'':24}   {'computation':^20}   {'(reported only)':^27}",
    f"{'turn':>4} {'instance':>8} {'prompt':>6} {'cached':>6} {'no lmkv':>8} {'lmkv':>7} {'speedup':>7} | "
    f"{'cached':>6} {'bit-identical':>13} | {'cached':>6} {'tokens':>6} {'max Δlogprob':>13}"))


def row(t: Turn) -> str:
    v = t.verdict
    exact = "yes" if v.identical else "NO" if v.same_computation else "no verdict"
    return (f"{t.number:>4} {t.with_lmkv + '/' + t.plain:>8} {t.prompt_tokens:>6} {v.cached[0]:>6} "
            f"{t.ttft_plain_s * 1000:>6.0f}ms {t.ttft_lmkv_s * 1000:>5.0f}ms {t.ttft_plain_s / t.ttft_lmkv_s:>6.1f}x | "
            f"{v.same_cached[0]:>6} {exact:>13} | {v.other_cached[0]:>6} "
            f"{'same' if v.other_same_tokens else 'DIFF':>6} {v.other_max_logprob_diff:>13.3g}")


def play(engines: Mapping[str, Engine], layout: Layout, seed: int = 0,
         out: Callable[[str], None] = print) -> list[Turn]:
    """The conversation on engines A, B (with lmkv), X, Y and R (without), one table row per
    turn; the prompt of each turn is the last one, A's or B's answer and a user message."""
    rng = random.Random(seed)
    history = [rng.randrange(3, 500) for _ in range(layout.system_tokens)]
    out(HEADER)
    out("-" * len(HEADER.splitlines()[-1]))
    turns = []
    for n in range(1, layout.turns + 1):
        prompt = history + [rng.randrange(3, 500) for _ in range(layout.user_tokens)]
        with_lmkv, plain = (engines["A"], engines["X"]) if n % 2 else (engines["B"], engines["Y"])
        got = with_lmkv.ask(prompt, layout.answer_tokens)
        other = plain.ask(prompt, layout.answer_tokens)
        same = engines["R"].ask(prompt, layout.answer_tokens)
        turns.append(Turn(n, with_lmkv.name, plain.name, len(prompt), got["ttft_s"], other["ttft_s"],
                          judge(got, same, other)))
        out(row(turns[-1]))
        history = prompt + got["token_ids"]
    return turns


def summary(turns: list[Turn]) -> tuple[str, int]:
    """What the table means, and the exit status: 0 iff every answer with lmkv was bit for bit
    R's, the same computation."""
    lines = []
    for t in turns:
        v = t.verdict
        if not v.same_computation:
            lines.append(f"turn {t.number}: {t.with_lmkv} took {v.cached} tokens from cache (per call) and R "
                         f"{v.same_cached}: not the same computation, so no verdict on lmkv's bytes")
    ok = all(t.verdict.identical for t in turns)
    alike = sum(t.verdict.other_same_tokens for t in turns)
    worst = max((t.verdict.other_max_logprob_diff for t in turns), default=0.0)
    lines += [
        f"answers identical with and without lmkv on every turn (vs R, the same computation): {'yes' if ok else 'NO'}",
        f"vs plain vLLM (X/Y, a different computation): the same tokens on {alike} of {len(turns)} turns, "
        f"logprobs at most {worst:.3g} apart",
        "",
        "R is the engine without lmkv that answered every turn: from its own prefix cache it reused exactly",
        "the tokens A or B got from cache, computed the same way, whichever kernels this CPU has; if lmkv's",
        "bytes are right, its answers are theirs to the bit. X and Y are A and B without lmkv: they reused",
        "what their own prefix cache held (other lengths), which the kernels need not compute to the same bits.",
        "A and B never share a process: what one computed reached the other only through the sidecar.",
    ]
    return "\n".join(lines), 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmkv_mp.demo", description=__doc__.split("\n\n")[0])
    default = Layout()
    ap.add_argument("--turns", type=int, default=default.turns)
    ap.add_argument("--system-tokens", type=int, default=default.system_tokens,
                    help="length of the shared conversation start")
    ap.add_argument("--user-tokens", type=int, default=default.user_tokens, help="new tokens per user turn")
    ap.add_argument("--answer-tokens", type=int, default=default.answer_tokens)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, model)")
    args = ap.parse_args(argv)
    layout = Layout(args.turns, args.system_tokens, args.user_tokens, args.answer_tokens)
    problem = layout.problem()
    if problem is not None:
        ap.error(problem)

    from lmkv_mp.demo.tiny_model import build_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="lmkv-demo-"))
    print(f"work dir {work}", flush=True)
    # head_dim 32: vLLM's CPU attention computes a prompt bit-identically after cached prefixes
    # of other lengths on AVX-512 machines (at head_dim 64 it does not, even with its own
    # prefix cache); the check against R holds on every CPU, that against X/Y only there.
    model = build_tiny_llama(work / "model", hidden_size=512, num_layers=8, num_heads=16, num_kv_heads=4,
                             head_dim=32, vocab_size=512, max_position=8192)
    run_dir = work / "run"
    sidecar = start_sidecar(run_dir, "512MiB", CHUNK_TOKENS)
    env = engine_env()
    lmkv = {"lmkv.endpoint": f"ipc://{run_dir}/control.sock"}
    longest = layout.system_tokens + layout.turns * (layout.user_tokens + layout.answer_tokens)
    spec: dict[str, Any] = {"model": model, "max_model_len": 8192, "kv_cache_bytes": 512 << 20,
                            "warmup_tokens": longest}
    processes: dict[str, EngineProcess] = {}
    try:
        print("starting the sidecar and 3 vLLM engines (A, B with lmkv; one without: X, Y and R) ...", flush=True)
        # The engine without lmkv has the connector configured all the same, aimed where no
        # sidecar listens (every lookup a miss): vLLM then runs the model as it does in A and
        # B, while merely configuring a connector has moved logprobs on some CPUs.
        nowhere = {"lmkv.endpoint": f"ipc://{work}/no-sidecar/control.sock"}
        for name, extra in (("A", lmkv), ("B", lmkv), ("plain", nowhere)):
            processes[name] = EngineProcess(name, {**spec, "lmkv": extra}, work, env)
        for e in processes.values():
            e.wait_ready()
        engines: dict[str, Engine] = {"A": processes["A"], "B": processes["B"],
                                      **{n: CacheNamespace(n, processes["plain"]) for n in ("X", "Y", "R")}}
        text, rc = summary(play(engines, layout))
        print("\n" + text)
        stats = subprocess.run([sys.executable, "-c", "import sys; from lmkv_mp.cli import stats_main; "
                                "sys.exit(stats_main(sys.argv[1:]))", "--run-dir", str(run_dir)],
                               capture_output=True, text=True)
        print("\n" + stats.stdout)
        return rc
    finally:
        for e in processes.values():
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
