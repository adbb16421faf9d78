"""Client-side prompt hashing (keys.chain_hashes) by part: packing the token list and the
chain at each lane count the CPU offers, against the pure-Python fallback of the same call.

A scheduler hashes a prompt before its LOOKUP (bench/compare.py adds the whole call to our
LOOKUP time). Here the call is split: ``pack`` (``_chain.pack_tokens`` of the list),
``chain`` (``_chain.chain`` over the packed bytes) at 8, 4 and 1 lanes where available,
``total`` (``chain_hashes`` as the connector calls it) and ``python`` (the same with the
C extension switched off). Medians of ``--iters`` calls; one JSON line:

    {"bench":"hashing","tokens":…,"pack_us":…,"chain_us":{"8":…,"4":…,"1":…},"total_us":…,"python_us":…}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from lmkv_mp.wire import keys  # noqa: E402


def median_us(fn: Callable[[], object], iters: int) -> float:
    fn()
    xs = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return round(statistics.median(xs) * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--iters", type=int, default=300, help="calls per measurement [300; quick 30]")
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    args = ap.parse_args()
    iters = 30 if args.quick else args.iters
    chain = keys._chain
    if chain is None:
        raise SystemExit("hashing: lmkv_mp.wire._chain is not built (pip install -e . with a C compiler)")
    key, toks = bytes(32), list(range(args.tokens))
    n = args.tokens // args.chunk_tokens
    raw = chain.pack_tokens(toks)
    first = bytes(16)
    lanes = [w for w in (8, 4, 1) if w <= chain.lanes()]
    chain_us = {str(w): median_us(lambda w=w: chain.chain(raw, args.chunk_tokens * 4, n, key, first, 16, w), iters)
                for w in lanes}
    rec = {"bench": "hashing", "tokens": args.tokens, "chunk_tokens": args.chunk_tokens, "iters": iters,
           "lanes_available": chain.lanes(), "pack_us": median_us(lambda: chain.pack_tokens(toks), iters),
           "chain_us": chain_us, "total_us": median_us(lambda: keys.chain_hashes(toks, args.chunk_tokens, key), iters)}
    keys._chain, keys._warned_python = None, True  # the fallback, without its "not built" warning
    try:
        rec["python_us"] = median_us(lambda: keys.chain_hashes(toks, args.chunk_tokens, key), max(5, iters // 10))
    finally:
        keys._chain = chain
    emit({**rec, "machine": machine()})


if __name__ == "__main__":
    main()
