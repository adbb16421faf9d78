#!/usr/bin/env bash
# serve-pd.sh — prefill/decode disaggregation on one node through lmkv: a prefill instance
# (kv_producer), a decode instance (kv_consumer) and launch/pd_proxy.py in front of them.
#
#   launch/serve-pd.sh MODEL [vllm serve args for both instances...]
#
# The prefill instance computes each prompt (max_tokens=1) and stores its chunks in the
# node's lmkv-sidecar; the decode instance loads them from the sidecar's shared memory and
# generates. Clients talk to the proxy (OpenAI API) on $LMKV_PD_PORT. Both instances go
# through launch/serve.sh, so a sidecar is started if none answers for this user, and
# stopped with the instance that started it.
#
# Environment: LMKV_PD_PORT (proxy, default 8000), LMKV_PD_PREFILL_PORT (8100),
# LMKV_PD_DECODE_PORT (8200), LMKV_PD_READY_TIMEOUT (seconds for each instance to answer
# /health, default 900), and every LMKV_*
# setting serve.sh and the connector read. Give each instance its own GPU with
# CUDA_VISIBLE_DEVICES as usual (LMKV_PD_PREFILL_ENV / LMKV_PD_DECODE_ENV, e.g.
# "CUDA_VISIBLE_DEVICES=0"). Ctrl-C stops all three.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 MODEL [vllm serve args...]" >&2; exit 2; }
model=$1; shift
port=${LMKV_PD_PORT:-8000}
pport=${LMKV_PD_PREFILL_PORT:-8100}
dport=${LMKV_PD_DECODE_PORT:-8200}
ready=${LMKV_PD_READY_TIMEOUT:-900}
ktc() {
    printf '{"kv_connector":"LMKVConnector","kv_connector_module_path":"lmkv_mp.integration.vllm","kv_role":"%s","kv_load_failure_policy":"recompute"}' "$1"
}
pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }
trap stop EXIT INT TERM

wait_health() {  # URL: poll until it answers or the deadline passes
    local deadline=$(( $(date +%s) + ready ))
    until curl -sf "$1/health" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "serve-pd.sh: $1 not ready in ${ready}s" >&2; exit 1; }
        sleep 1
    done
}

# The prefill instance first: its serve.sh starts the sidecar if none runs, and the decode
# instance's then finds it.
env ${LMKV_PD_PREFILL_ENV:-} LMKV_SERVE_KV_TRANSFER_CONFIG="$(ktc kv_producer)" \
    "$here/serve.sh" "$model" --port "$pport" "$@" &
pids+=($!)
wait_health "http://127.0.0.1:$pport"
env ${LMKV_PD_DECODE_ENV:-} LMKV_SERVE_KV_TRANSFER_CONFIG="$(ktc kv_consumer)" \
    "$here/serve.sh" "$model" --port "$dport" "$@" &
pids+=($!)
wait_health "http://127.0.0.1:$dport"
python "$here/pd_proxy.py" --prefill "http://127.0.0.1:$pport" --decode "http://127.0.0.1:$dport" --port "$port" &
pids+=($!)
wait "${pids[-1]}"
