#!/usr/bin/env bash
# Soak test of a scaled-out set-up: two proxy replicas sharing one Redis (REDIS_URL), each under
# the same bounded mixed load as scripts/soak.sh, checking that no request is lost, that neither
# replica's memory grows, and that the replicas stayed in shared mode throughout.
#
#   scripts/soak-replicas.sh                          # 30 s measured after a 10 s warm-up
#   SOAK_SECONDS=300 SOAK_WORKERS=32 scripts/soak-replicas.sh
#
# What it does: builds the release binaries, starts redis-server on a free loopback port (no
# persistence, in a temporary directory), the mock upstream (--no-record) and two proxies with
# REDIS_URL and a clients file whose one client has shared per-minute and concurrency limits far
# above what the load reaches (so every request takes the Redis-backed decision and none is
# refused), runs a warm-up of the mix against both replicas at once, reads each replica's RSS,
# runs the measured phase, reads them again. Every request has an expected answer (see
# tools/loadgen, `loadgen soak`); one that does not get it is lost.
#
# Exit status: 0 when no request was lost, neither replica's RSS grew by more than
# SOAK_MAX_GROWTH_PCT and both still report "limits":"shared" on /readyz; 1 otherwise; 2 on a
# usage error or a missing redis-server (Debian package redis-server).
#
# Settings (environment): SOAK_SECONDS (30), SOAK_WARMUP_SECONDS (10), SOAK_WORKERS (16 per
# replica), SOAK_MAX_GROWTH_PCT (10), SOAK_TIMEOUT (10), SOAK_SKIP_BUILD=1, SOAK_KEEP=1.
# Everything listens on and talks to 127.0.0.1 only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/processes.sh
source "$ROOT/scripts/lib/processes.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

SECONDS_RUN="${SOAK_SECONDS:-30}"
WARMUP="${SOAK_WARMUP_SECONDS:-10}"
WORKERS="${SOAK_WORKERS:-16}"
MAX_GROWTH="${SOAK_MAX_GROWTH_PCT:-10}"
TIMEOUT="${SOAK_TIMEOUT:-10}"
MAX_BODY=65536

usage_error() {
    echo "soak-replicas.sh: $1" >&2
    exit 2
}
for pair in "SOAK_SECONDS=$SECONDS_RUN" "SOAK_WARMUP_SECONDS=$WARMUP" "SOAK_WORKERS=$WORKERS" \
    "SOAK_MAX_GROWTH_PCT=$MAX_GROWTH" "SOAK_TIMEOUT=$TIMEOUT"; do
    [[ "${pair#*=}" =~ ^[0-9]+$ ]] || usage_error "${pair%%=*} must be a whole number"
done
((SECONDS_RUN >= 1 && SECONDS_RUN <= 86400)) || usage_error "SOAK_SECONDS must be 1..86400"
((WORKERS >= 1 && WORKERS <= 256)) || usage_error "SOAK_WORKERS must be 1..256"
command -v redis-server >/dev/null || usage_error "needs redis-server (Debian package redis-server)"
command -v python3 >/dev/null || usage_error "needs python3"

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

CLIENT_TOKEN="soak-$$-$RANDOM$RANDOM"
UPSTREAM_KEY="sk-soak-upstream-$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-proxy-soak-replicas.XXXXXX")"
REDIS_PID="" MOCK_PID="" PROXY_A="" PROXY_B="" LOAD_A="" LOAD_B=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$LOAD_A"
    stop "$LOAD_B"
    stop "$PROXY_A"
    stop "$PROXY_B"
    stop "$MOCK_PID"
    stop "$REDIS_PID"
    if [[ "${SOAK_KEEP:-0}" == 1 || "$status" == 1 ]]; then
        echo "==> work directory kept: $WORK (a/proxy.log, b/proxy.log, redis.log, <phase>-<replica>.json)"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ "${SOAK_SKIP_BUILD:-0}" != 1 ]]; then
    echo "==> building llm-proxy, mock-upstream and loadgen (release)"
    (cd "$ROOT" && cargo build --release --bin llm-proxy --bin mock-upstream &&
        cargo build --release -p loadgen)
fi
LOADGEN="$BIN/loadgen"

REDIS_PORT="$("$LOADGEN" free-port)"
echo "==> starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
(cd "$WORK" && exec redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir "$WORK") >"$WORK/redis.log" 2>&1 </dev/null &
REDIS_PID=$!
wait_for_line "$WORK/redis.log" 'Ready to accept connections' 10 "$REDIS_PID" >/dev/null ||
    { cat "$WORK/redis.log"; exit 1; }

echo "==> starting mock-upstream (--no-record)"
start_mock "$WORK" "$BIN" --no-record || exit 1

cat >"$WORK/clients.toml" <<EOF
[clients.soak]
token = "$CLIENT_TOKEN"
requests_per_minute = 100000000
max_concurrent_requests = 100000
EOF

declare -A PORT
for replica in a b; do
    mkdir -p "$WORK/$replica"
    echo "==> starting replica $replica (REDIS_URL, CLIENTS_FILE)"
    start_proxy "$WORK/$replica" "$BIN" \
        TARGET_HOST="$MOCK_URL" \
        AUTH_BEARER="$UPSTREAM_KEY" \
        CLIENTS_FILE="$WORK/clients.toml" \
        REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
        REDIS_TIMEOUT_MS=250 \
        MAX_BODY_BYTES="$MAX_BODY" \
        LOG_LEVEL=info \
        SHUTDOWN_GRACE_SECS=2 || exit 1
    PORT[$replica]="$PROXY_PORT"
    if [[ "$replica" == a ]]; then PROXY_A="$PROXY_PID"; else PROXY_B="$PROXY_PID"; fi
    echo "    pid $PROXY_PID, port $PROXY_PORT"
done
declare -A PID=([a]="$PROXY_A" [b]="$PROXY_B")

loadgen() {
    local replica="$1"
    shift
    "$LOADGEN" soak --host 127.0.0.1 --port "${PORT[$replica]}" --token "$CLIENT_TOKEN" \
        --max-body "$MAX_BODY" --timeout "$TIMEOUT" --workers "$WORKERS" \
        --pid "${PID[$replica]}" --progress 0 "$@" </dev/null
}

for replica in a b; do
    loadgen "$replica" --ready || { cat "$WORK/$replica/proxy.log"; exit 1; }
done

FAILURES=()

# Runs the mix against both replicas at once for $2 seconds.
run_phase() {
    local label="$1" seconds="$2" status_a=0 status_b=0
    echo "==> $label: $seconds s of the mix on each replica, $WORKERS workers each"
    loadgen a --label "$label-a" --seconds "$seconds" --seed "$RANDOM" --json "$WORK/$label-a.json" &
    LOAD_A=$!
    loadgen b --label "$label-b" --seconds "$seconds" --seed "$RANDOM" --json "$WORK/$label-b.json" &
    LOAD_B=$!
    wait "$LOAD_A" || status_a=$?
    wait "$LOAD_B" || status_b=$?
    LOAD_A="" LOAD_B=""
    for replica in a b; do
        local lost
        lost="$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["lost"]+s["unfinished"], s["sent"])' \
            "$WORK/$label-$replica.json" 2>/dev/null || echo "? ?")"
        echo "    replica $replica: ${lost#* } requests, ${lost%% *} lost or unfinished"
    done
    ((status_a == 0)) || FAILURES+=("$label: requests lost on replica a")
    ((status_b == 0)) || FAILURES+=("$label: requests lost on replica b")
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
settle() { sleep 3; }

run_phase warm-up "$WARMUP"
settle
RSS0_A="$(rss_kb "$PROXY_A")" RSS0_B="$(rss_kb "$PROXY_B")"
echo "    start: replica a $RSS0_A kB, replica b $RSS0_B kB"
run_phase soak "$SECONDS_RUN"
settle
RSS1_A="$(rss_kb "$PROXY_A")" RSS1_B="$(rss_kb "$PROXY_B")"
echo "    end:   replica a $RSS1_A kB, replica b $RSS1_B kB"

growth() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f", (b - a) * 100 / a }'; }
over_limit() { awk -v g="$1" -v m="$MAX_GROWTH" 'BEGIN { exit !(g > m) }'; }
for replica in a b; do
    if [[ "$replica" == a ]]; then from="$RSS0_A" to="$RSS1_A"; else from="$RSS0_B" to="$RSS1_B"; fi
    change="$(growth "$from" "$to")"
    echo "    replica $replica RSS: $change%"
    over_limit "$change" && FAILURES+=("replica $replica RSS grew by $change% (limit $MAX_GROWTH%)")
    ready="$(python3 -c 'import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
        "http://127.0.0.1:${PORT[$replica]}/readyz" 2>/dev/null || echo "unreachable")"
    [[ "$ready" == *'"limits":"shared"'* ]] ||
        FAILURES+=("replica $replica is not in shared mode at the end: $ready")
done

if ((${#FAILURES[@]} > 0)); then
    for failure in "${FAILURES[@]}"; do echo "FAIL  $failure"; done
    exit 1
fi
echo "PASS  two replicas sharing Redis: no request lost, RSS flat, shared mode throughout"
