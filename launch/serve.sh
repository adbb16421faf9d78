#!/usr/bin/env bash
# serve.sh — run `vllm serve` wired to this node's lmkv-sidecar, starting the sidecar first
# if none is running for this user.
#
#   launch/serve.sh MODEL [vllm serve args...]
#   e.g. launch/serve.sh meta-llama/Llama-3.1-8B-Instruct --max-model-len 32768
#
# What it does, in order:
#   1. Asks `lmkv-stats --json` whether a sidecar already answers for this user (same run dir
#      / stats endpoint as vLLM will use). If one does, it is reused and never touched.
#   2. Otherwise starts `lmkv-sidecar` in the background, its output appended to a log file
#      in the run dir, and polls `lmkv-stats` until it answers (deadline, no fixed sleep).
#   3. Runs `vllm serve "$@" --kv-transfer-config '{... LMKVConnector ...}'`.
#      - Sidecar reused:  vLLM is exec'd (this shell is replaced; signals go straight to it).
#      - Sidecar started: vLLM runs as a child so that, when it exits, this script can stop
#        the sidecar it started (SIGTERM, then SIGKILL after a grace period). SIGINT/SIGTERM/
#        SIGHUP sent to this script are forwarded to vLLM as one SIGTERM (graceful shutdown);
#        the script then exits with vLLM's exit status.
#
# Both programs must be on PATH (e.g. `. .venv/bin/activate` or `. launch/setup-venv.sh`).
#
# Environment (everything is optional):
#   LMKV_*                      Every sidecar flag has an LMKV_* twin (`lmkv-sidecar --help`):
#                               LMKV_HOST_POOL_SIZE=16GiB, LMKV_RUN_DIR=..., LMKV_LOG_LEVEL=...
#                               They are simply inherited by BOTH processes, so the sidecar and
#                               vLLM's connector agree on where to meet: the connector reads
#                               LMKV_RUN_DIR / LMKV_ENDPOINT / LMKV_CLIENT_TIMEOUT / ... itself.
#                               (LMKV_ENDPOINT is bound by the sidecar and dialled by vLLM, so a
#                               tcp:// endpoint must name a real host, not `*`.)
#   LMKV_SERVE_LOG              sidecar log file (default: <run dir>/sidecar.log, appended).
#   LMKV_SERVE_READY_TIMEOUT    seconds to wait for a started sidecar to answer (default 60).
#   LMKV_SERVE_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL when stopping the sidecar
#                               this script started (default 15).
#   LMKV_SERVE_KV_TRANSFER_CONFIG
#                               the JSON given to vLLM's --kv-transfer-config (default below).
#                               Set it to add e.g. "kv_connector_extra_config":{"lmkv.tenant":"a"}.
#                               An explicit `--kv-transfer-config` among the vLLM args wins
#                               instead: then this script adds none of its own.
#
# Exit status: vLLM's; 1 if the sidecar could not be started; 2 on a usage or config error.

set -euo pipefail

# The connector config vLLM gets. kv_load_failure_policy=recompute: lmkv is a best-effort
# cache, a chunk that cannot be loaded must be recomputed, never fail the request (the
# connector forces this too, and logs it; setting it here keeps the log quiet).
readonly DEFAULT_KV_TRANSFER_CONFIG='{"kv_connector":"LMKVConnector","kv_connector_module_path":"lmkv_mp.integration.vllm","kv_role":"kv_both","kv_load_failure_policy":"recompute"}'
kv_transfer_config=${LMKV_SERVE_KV_TRANSFER_CONFIG:-$DEFAULT_KV_TRANSFER_CONFIG}
ready_timeout=${LMKV_SERVE_READY_TIMEOUT:-60}
stop_timeout=${LMKV_SERVE_STOP_TIMEOUT:-15}

say() { printf 'serve.sh: %s\n' "$*" >&2; }

if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    say "usage: launch/serve.sh MODEL [vllm serve args...]   (see the header of this file)"
    exit 2
fi
for n in "$ready_timeout" "$stop_timeout"; do
    case $n in
        '' | *[!0-9]*) say "LMKV_SERVE_READY_TIMEOUT / LMKV_SERVE_STOP_TIMEOUT must be whole seconds, got '$n'"; exit 2 ;;
    esac
done

# All three come from PATH (activate the venv that has lmkv_mp and vllm first).
for cmd in lmkv-sidecar lmkv-stats vllm; do
    command -v "$cmd" >/dev/null || { say "$cmd is not on PATH (activate the venv with lmkv_mp and vllm)"; exit 2; }
done

# The run dir, computed exactly as lmkv_mp.config does it (ARCHITECTURE.md §8): LMKV_RUN_DIR,
# else $XDG_RUNTIME_DIR/lmkv when XDG_RUNTIME_DIR is absolute, else /tmp/lmkv-<uid>. It is only
# used here for the default log location; the sidecar and vLLM work it out themselves from
# the same environment, so it is not exported.
if [ -n "${LMKV_RUN_DIR:-}" ]; then
    run_dir=$LMKV_RUN_DIR
else
    case ${XDG_RUNTIME_DIR:-} in
        /*) run_dir=$XDG_RUNTIME_DIR/lmkv ;;
        *) run_dir=/tmp/lmkv-$(id -u) ;;
    esac
fi
log_file=${LMKV_SERVE_LOG:-$run_dir/sidecar.log}

# Add our --kv-transfer-config unless the caller passed one (theirs wins). It goes after
# the caller's args so it can never be taken as the value of one of their options.
vllm_args=("$@")
has_kvtc=0
for arg in "$@"; do
    case $arg in --kv-transfer-config | --kv-transfer-config=*) has_kvtc=1 ;; esac
done
if [ "$has_kvtc" = 0 ]; then
    vllm_args+=(--kv-transfer-config "$kv_transfer_config")
else
    say "using the --kv-transfer-config given on the command line (it must name LMKVConnector for lmkv to be used)"
fi

# The stats socket's path when it is a Unix socket (LMKV_STATS_ENDPOINT=ipc://..., or the
# default <run dir>/stats.sock), else empty. No socket file means no sidecar, which saves a
# (slow, Python-starting) lmkv-stats call; a socket file alone proves nothing (a crashed
# sidecar leaves its file behind), so lmkv-stats still has the last word.
case ${LMKV_STATS_ENDPOINT:-} in
    '') stats_sock=$run_dir/stats.sock ;;
    ipc://*) stats_sock=${LMKV_STATS_ENDPOINT#ipc://} ;;
    *) stats_sock= ;;
esac
sock_missing() { [ -n "$stats_sock" ] && [ ! -S "$stats_sock" ]; }

# lmkv-stats exits 0 when a sidecar answers, 1 when none does, 2 on a bad setting.
# $1: its --timeout. Output is discarded; only the exit status matters.
probe() { lmkv-stats --json --timeout "$1" >/dev/null 2>&1; }

# --- 1. a sidecar already running? --------------------------------------------------------
probe_rc=0
if sock_missing; then
    probe_rc=1
else
    probe 2s || probe_rc=$?
fi
if [ "$probe_rc" = 0 ]; then
    # Someone else's sidecar (systemd, another serve.sh, by hand): use it, leave it alone.
    say "an lmkv-sidecar already answers; using it"
    exec vllm serve "${vllm_args[@]}"
fi
if [ "$probe_rc" != 1 ]; then
    # Not "nobody answered": the LMKV_* settings themselves are bad. Show lmkv-stats' message.
    lmkv-stats --json --timeout 2s >/dev/null || true
    exit 2
fi

# --- 2. start one ----------------------------------------------------------------------------
# The sidecar creates the run dir itself (mode 0700); we create it first only so the log file
# can live in it. mkdir -m applies to the last component, which is what the sidecar checks.
mkdir -p -m 0700 -- "$run_dir"
(umask 077 && : >>"$log_file")  # a new log file is owner-only, like everything else lmkv writes

# Stop the sidecar we started, whatever way this script ends (normal exit, error, signal).
stop_sidecar() {
    trap - EXIT
    if kill -0 "$sidecar_pid" 2>/dev/null; then
        say "stopping the lmkv-sidecar this script started (pid $sidecar_pid)"
        kill -TERM "$sidecar_pid" 2>/dev/null || true
        local deadline=$((SECONDS + stop_timeout))
        while kill -0 "$sidecar_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
        if kill -0 "$sidecar_pid" 2>/dev/null; then
            say "lmkv-sidecar did not stop within ${stop_timeout}s; sending SIGKILL"
            kill -KILL "$sidecar_pid" 2>/dev/null || true
        fi
    fi
    wait "$sidecar_pid" 2>/dev/null || true  # reap it: no zombie, no orphan
}

say "starting lmkv-sidecar (log: $log_file)"
# `set -m` puts the sidecar in its own process group: a Ctrl-C on the terminal reaches this
# script (which shuts vLLM down first) but not the sidecar, which is stopped afterwards.
set -m
lmkv-sidecar </dev/null >>"$log_file" 2>&1 &
sidecar_pid=$!
trap stop_sidecar EXIT  # from here on, every way out of this script stops it
set +m

# Poll until it answers. Fails at once if the process exits (bad setting, another sidecar
# holding the run dir's lock, ...), with the end of its log.
deadline=$((SECONDS + ready_timeout))
until ! sock_missing && probe 1s; do
    if ! kill -0 "$sidecar_pid" 2>/dev/null; then
        rc=0
        wait "$sidecar_pid" || rc=$?
        say "lmkv-sidecar exited with status $rc before answering; end of $log_file:"
        tail -n 20 -- "$log_file" >&2 || true
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "lmkv-sidecar did not answer within ${ready_timeout}s; end of $log_file:"
        tail -n 20 -- "$log_file" >&2 || true
        exit 1
    fi
    sleep 0.2
done
say "lmkv-sidecar is up (pid $sidecar_pid)"

# --- 3. run vLLM -------------------------------------------------------------------------------
# Own process group too (see above), so one Ctrl-C gives vLLM exactly one SIGTERM, from us.
set -m
vllm serve "${vllm_args[@]}" &
vllm_pid=$!
set +m

forwarded=0
forward() { forwarded=1; kill -TERM "$vllm_pid" 2>/dev/null || true; }
trap forward INT TERM HUP

# `wait` returns early when a trapped signal arrives; keep waiting until vLLM itself exits.
while :; do
    forwarded=0
    vllm_rc=0
    wait "$vllm_pid" || vllm_rc=$?
    if [ "$forwarded" = 0 ] || ! kill -0 "$vllm_pid" 2>/dev/null; then
        break
    fi
done
trap - INT TERM HUP
say "vllm exited with status $vllm_rc"
exit "$vllm_rc"  # the EXIT trap stops the sidecar
