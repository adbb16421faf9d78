"""bench/report.py's serving section: bench/serve.py's lines as table rows and plots.

Pure functions of the JSON lines (no engine, no matplotlib import here: report.py passes
its pyplot in), so the README block stays a function of the results file alone.
"""

from __future__ import annotations

from typing import Any

SYSTEM_ORDER = ("none", "lmkv", "lmcache", "own-cache-limit")
SCENARIO_NAMES = {"1": "1: multi-round chat, 2 instances", "2": "2: offload, one instance, 1/4 cache",
                  "3": "3: no reuse, one instance", "bench": "vllm bench serve (prefix_repetition)"}
METRIC_NAMES = {"ttft_p50_ms": "TTFT p50", "ttft_p99_ms": "TTFT p99", "req_per_s": "req/s",
                "server_cpu_s_per_req": "cache server CPU s per request"}
HEADER = ["scenario", "system", "TTFT p50", "p90", "p99", "ITL p50", "e2e p50", "req/s", "out tok/s", "cached",
          "failed", "answers ≠ none (of those computed alike)", "cache server CPU s/req", "its RSS"]
RATIO_HEADER = ["scenario", "metric", "system vs", "ours", "theirs", "ratio", "target", "met"]


def result_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (scenario, system) lines, by scenario then system."""
    rows = [r for r in lines if r.get("bench") == "serve" and "system" in r and "ttft_p50_ms" in r]
    order = list(SCENARIO_NAMES)
    return sorted(rows, key=lambda r: (order.index(r["scenario"]) if r["scenario"] in order else 9,
                                       SYSTEM_ORDER.index(r["system"]) if r["system"] in SYSTEM_ORDER else 9))


def ratio_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in lines if r.get("bench") == "serve" and "ratio" in r]


def skipped(lines: list[dict[str, Any]]) -> list[str]:
    """What did not run, as sentences."""
    out = []
    for r in lines:
        if r.get("bench") == "serve" and "skipped" in r:
            what = f"scenario {r['scenario']}" if "scenario" in r else f"system {r.get('system')}"
            out.append(f"{what}: skipped ({r['skipped']}).")
        elif r.get("bench") == "serve" and "error" in r and "ttft_p50_ms" not in r:
            out.append(f"system {r.get('system')}: did not run ({r['error'].strip().splitlines()[-1][:160]}).")
    return out


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f} ms" if x < 1000 else f"{x / 1000:.2f} s"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table_rows(lines: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in result_lines(lines):
        differ = (f"{r['answers_differ']} of {r['answers_compared']}" if "answers_compared" in r else "—")
        if "answers_same_computation" in r:
            differ += f" ({r['answers_differ_same_computation']} of {r['answers_same_computation']} alike)"
        rows.append([r["scenario"], r["system"], _ms(r.get("ttft_p50_ms")), _ms(r.get("ttft_p90_ms")),
                     _ms(r.get("ttft_p99_ms")), _ms(r.get("itl_p50_ms")), _ms(r.get("e2e_p50_ms")),
                     _num(r.get("req_per_s"), ".3f"), _num(r.get("out_tok_per_s"), ".1f"),
                     "—" if r.get("cached_frac") is None else f"{100 * r['cached_frac']:.0f}%",
                     str(r.get("failed", 0)), differ, _num(r.get("server_cpu_s_per_req"), ".4f"),
                     "—" if r.get("server_rss_mib") is None else f"{r['server_rss_mib']:.0f} MiB"])
    return rows


def ratio_rows(lines: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in ratio_lines(lines):
        metric = r["metric"]
        fmt = (lambda x: _ms(x)) if metric.endswith("_ms") else (lambda x: _num(x, ".4g"))
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        target = "—" if r["target"] is None else (f"> {r['target']:.3g}×" if metric == "ttft_p99_ms"
                                                   else f"≥ {r['target']:.3g}×")
        rows.append([r["scenario"], METRIC_NAMES.get(metric, metric), f"{r.get('system', 'lmkv')} vs {r['against']}",
                     fmt(r.get("ours")), fmt(r.get("theirs")), _num(r["ratio"], ".2f") + "×", target, met])
    return rows


def config_line(lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in lines if r.get("bench") == "serve" and r.get("config")), None)


def describe(cfg: dict[str, Any] | None) -> str:
    """One sentence on the workload and the model, from serve.py's config line."""
    if cfg is None:
        return ""
    m, c = cfg["model"], cfg["chat"]
    return (f"Model: random Llama, hidden {m['hidden']} x {m['layers']} layers, bf16, seed {m['seed']}; each "
            f"instance pinned to one core. Chat: {c['users']} users x {c['rounds']} rounds, system prompt "
            f"{c['system_tokens']} tokens, history {c['history_tokens']}, question {c['question_tokens']}, answer "
            f"{c['answer_tokens']} (greedy), Poisson arrivals at {c['qps']:g} QPS "
            f"({'CI-sized, --quick' if cfg.get('quick') else 'LMCache multi_round_qa shape scaled to 2 cores'}); "
            f"scenario 2's engine cache holds {100 * cfg['offload_kv_frac']:.0f}% of the "
            f"{c['working_set_tokens']}-token working set; scenario 3: {cfg['unique']['n']} unique prompts of "
            f"{cfg['unique']['tokens']} tokens at {cfg['unique']['qps']:g} QPS.")


def _plain_log_ticks(plt: Any, axis: Any) -> None:
    """Log-scale ticks labelled 20, 50, 100 instead of 2x10^1 (minor labels overlap)."""
    axis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(plt.NullFormatter())


def draw_ttft(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """TTFT distribution (CDF) per scenario, one line per system."""
    scenarios = [s for s in SCENARIO_NAMES if any(r["scenario"] == s and r.get("ttft_ms") for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(scenarios)), figsize=(4 * max(1, len(scenarios)), 4), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        for r in rows:
            if r["scenario"] == sc and r.get("ttft_ms"):
                xs = sorted(x for x in r["ttft_ms"] if x is not None)
                color = f"C{SYSTEM_ORDER.index(r['system'])}" if r["system"] in SYSTEM_ORDER else None
                ax.step(xs, [100 * (i + 1) / len(xs) for i in range(len(xs))], where="post", label=r["system"],
                        color=color, linestyle="--" if r["system"] == "own-cache-limit" else "-")
        ax.set_xscale("log")
        _plain_log_ticks(plt, ax.xaxis)
        ax.set_title(SCENARIO_NAMES[sc], fontsize=9)
        ax.set_xlabel("TTFT (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("% of requests")
    return fig


def draw_rounds(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Scenario 1's TTFT p50 by chat round, one line per system."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in rows:
        if r["scenario"] == "1" and r.get("ttft_p50_ms_by_round"):
            by = r["ttft_p50_ms_by_round"]
            ks = sorted(by, key=int)
            ax.plot([int(k) + 1 for k in ks], [by[k] for k in ks], marker="o", label=r["system"],
                    color=f"C{SYSTEM_ORDER.index(r['system'])}" if r["system"] in SYSTEM_ORDER else None,
                    linestyle="--" if r["system"] == "own-cache-limit" else "-")
    ax.set_yscale("log")
    _plain_log_ticks(plt, ax.yaxis)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("TTFT p50 (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
