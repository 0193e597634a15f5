#!/usr/bin/env bash
# Soak test: a bounded mixed load against the proxy on 127.0.0.1, checking that it neither loses
# requests nor leaks memory or file descriptors.
#
#   scripts/soak.sh                                   # 60 s, 32 workers
#   SOAK_SECONDS=600 SOAK_WORKERS=64 scripts/soak.sh  # longer, wider
#
# What it does: builds the release binaries, starts the mock upstream (--no-record, so the mock
# itself does not grow) and the proxy with a small MAX_BODY_BYTES, waits until a chat request
# goes through, runs a warm-up of the same mix (so allocator and connection-pool warm-up is not
# counted as growth), lets the proxy settle and takes the "start" reading, runs the mix for
# SOAK_SECONDS, lets it settle again (the load generator has exited, so every client connection
# is closed) and takes the "end" reading. The mix, from `loadgen soak` (tools/loadgen): plain chat,
# streamed chat, streams cancelled after the first event (RST or FIN), oversized bodies (declared
# and chunked, 413), requests without a valid token (401), malformed HTTP (400) and the model
# list. Every request has an expected answer; one that does not get it is "lost".
#
# Readings are of the proxy process only: RSS is VmRSS from /proc/PID/status, fds the entries
# of /proc/PID/fd (with a breakdown: listening socket, client connections, upstream connections,
# other). The proxy keeps idle upstream connections for 90 s, as many as it last needed at once;
# so that this does not make the fd count wander by the pool's whim, each reading is preceded by
# SOAK_WORKERS overlapping plain requests (held 300 ms at the mock), which leave exactly one
# pooled connection per worker -- no phase ever has more upstream requests in flight, so a pool
# that leaks still shows up as growth.
#
# Exit status: 0 when no request was lost (warm-up included) and neither RSS nor the fd count
# grew by more than SOAK_MAX_GROWTH_PCT between the readings; 1 otherwise (the proxy's last log
# lines are printed); 2 on a usage error.
#
# Settings (environment):
#   SOAK_SECONDS          length of the measured run (default 60)
#   SOAK_WORKERS          concurrent client tasks, each with at most one request in flight (32)
#   SOAK_WARMUP_SECONDS   warm-up run before the start reading (15: the proxy's heap, about
#                         4 MB, takes some 10-30 s of this load to reach its working size; with
#                         5 s that climb of ~0.5 MB lands in the measured growth)
#   SOAK_SETTLE_SECONDS   minimum quiet time before each reading (3); a reading also waits, up
#                         to SOAK_SETTLE_MAX_SECONDS (15), until no client connection is left
#                         and the fd count is steady for a second
#   SOAK_TIMEOUT          per-request timeout in seconds (10)
#   SOAK_MAX_GROWTH_PCT   allowed RSS and fd growth in percent (10)
#   SOAK_MAX_BODY_BYTES   the proxy's MAX_BODY_BYTES for the run (65536)
#   SOAK_MAX_REQUESTS     cap on requests started per phase (2000000)
#   SOAK_LOG_LEVEL        the proxy's LOG_LEVEL (info): info writes one access line per request,
#                         about 150 bytes each (~12 MB a minute here), which the report counts
#                         by status and outcome; use error for hour-long runs
#   SOAK_SKIP_BUILD=1     use the binaries in target/release as they are
#   SOAK_KEEP=1           keep the work directory (logs, JSON figures) and print its path; it
#                         is kept anyway when the soak fails
#
# Everything listens on and talks to 127.0.0.1 only, except that the proxy itself binds
# 0.0.0.0 (it has no bind-address setting); its port is an ephemeral one picked by the kernel and
# every request needs a token that exists only for this run. Needs: cargo, python3 (stdlib, for
# the report); the readings come from `loadgen procinfo` (tools/loadgen).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/processes.sh
source "$ROOT/scripts/lib/processes.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
LOADGEN="$BIN/loadgen"

SECONDS_RUN="${SOAK_SECONDS:-60}"
WORKERS="${SOAK_WORKERS:-32}"
WARMUP="${SOAK_WARMUP_SECONDS:-15}"
SETTLE="${SOAK_SETTLE_SECONDS:-3}"
SETTLE_MAX="${SOAK_SETTLE_MAX_SECONDS:-15}"
TIMEOUT="${SOAK_TIMEOUT:-10}"
MAX_GROWTH="${SOAK_MAX_GROWTH_PCT:-10}"
MAX_BODY="${SOAK_MAX_BODY_BYTES:-65536}"
MAX_REQUESTS="${SOAK_MAX_REQUESTS:-2000000}"
LOG_LEVEL="${SOAK_LOG_LEVEL:-info}"

usage_error() {
    echo "soak.sh: $1" >&2
    exit 2
}
for pair in "SOAK_SECONDS=$SECONDS_RUN" "SOAK_WORKERS=$WORKERS" "SOAK_WARMUP_SECONDS=$WARMUP" \
    "SOAK_SETTLE_SECONDS=$SETTLE" "SOAK_SETTLE_MAX_SECONDS=$SETTLE_MAX" "SOAK_TIMEOUT=$TIMEOUT" \
    "SOAK_MAX_GROWTH_PCT=$MAX_GROWTH" "SOAK_MAX_BODY_BYTES=$MAX_BODY" \
    "SOAK_MAX_REQUESTS=$MAX_REQUESTS"; do
    [[ "${pair#*=}" =~ ^[0-9]+$ ]] || usage_error "${pair%%=*} must be a whole number, not '${pair#*=}'"
done
((SECONDS_RUN >= 1 && SECONDS_RUN <= 86400)) || usage_error "SOAK_SECONDS must be 1..86400"
((WORKERS >= 1 && WORKERS <= 512)) || usage_error "SOAK_WORKERS must be 1..512"
((WARMUP >= 1)) || usage_error "SOAK_WARMUP_SECONDS must be at least 1"
((TIMEOUT >= 1)) || usage_error "SOAK_TIMEOUT must be at least 1"
((MAX_BODY >= 1024)) || usage_error "SOAK_MAX_BODY_BYTES must be at least 1024"
case "$LOG_LEVEL" in info | error | debug) ;; *) usage_error "SOAK_LOG_LEVEL must be info, error or debug" ;; esac

command -v python3 >/dev/null || usage_error "needs python3"

# Loopback only, whatever proxies the caller's shell names (reqwest in the proxy honours them
# too, but the proxy gets a clean environment below anyway).
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

# Made up for this run; the mock accepts any upstream key.
CLIENT_TOKEN="soak-$$-$RANDOM$RANDOM"
UPSTREAM_KEY="sk-soak-upstream-$$"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-proxy-soak.XXXXXX")"
MOCK_PID=""
PROXY_PID=""
LOADGEN_PID=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop "$LOADGEN_PID"
    stop "$PROXY_PID"
    stop "$MOCK_PID"
    if [[ "${SOAK_KEEP:-0}" == 1 || "$status" == 1 ]]; then
        echo "==> work directory kept: $WORK (proxy.log, mock.*, <phase>.json)"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

strip_colour() { sed -e 's/\x1b\[[0-9;]*m//g' "$@"; }

# True while process $1 runs (a dead child stays a zombie until waited for, and kill -0 would
# still succeed on it).
alive() { [[ -r "/proc/$1/status" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

show_proxy_log() {
    local lines="${1:-40}"
    echo "==> last $lines lines of the proxy's log ($(wc -l <"$WORK/proxy.log") lines in all)"
    strip_colour "$WORK/proxy.log" | tail -n "$lines" | sed -e 's/^/    /'
}

if [[ "${SOAK_SKIP_BUILD:-0}" != 1 ]]; then
    echo "==> building llm-proxy, mock-upstream and loadgen (release)"
    (cd "$ROOT" && cargo build --release --bin llm-proxy --bin mock-upstream &&
        cargo build --release -p loadgen)
fi
for binary in llm-proxy mock-upstream loadgen; do
    [[ -x "$BIN/$binary" ]] || usage_error "$BIN/$binary is missing (unset SOAK_SKIP_BUILD)"
done

echo "==> starting mock-upstream on 127.0.0.1 (--no-record)"
start_mock "$WORK" "$BIN" --no-record || exit 1

echo "==> starting llm-proxy (MAX_BODY_BYTES=$MAX_BODY, LOG_LEVEL=$LOG_LEVEL)"
start_proxy "$WORK" "$BIN" \
    TARGET_HOST="$MOCK_URL" \
    AUTH_BEARER="$UPSTREAM_KEY" \
    LOG_LEVEL="$LOG_LEVEL" \
    AUTH_VALIDATION=true \
    ALLOWED_TOKENS="$CLIENT_TOKEN" \
    MAX_BODY_BYTES="$MAX_BODY" \
    SHUTDOWN_GRACE_SECS=2 || exit 1
# The readings must be of the proxy itself, not of a wrapper process.
[[ "$(readlink "/proc/$PROXY_PID/exe")" == */llm-proxy ]] ||
    usage_error "PID $PROXY_PID is $(readlink "/proc/$PROXY_PID/exe"), not llm-proxy"
echo "    pid $PROXY_PID, listening on port $PROXY_PORT; the load goes to 127.0.0.1:$PROXY_PORT"

# Runs the load generator in the background and waits for it, so that a signal to this script
# is handled at once (bash defers traps until a foreground child exits) and the trap can stop it.
loadgen() {
    "$LOADGEN" soak --host 127.0.0.1 --port "$PROXY_PORT" --token "$CLIENT_TOKEN" \
        --max-body "$MAX_BODY" --timeout "$TIMEOUT" --workers "$WORKERS" \
        --max-requests "$MAX_REQUESTS" --pid "$PROXY_PID" "$@" </dev/null &
    LOADGEN_PID=$!
    local status=0
    wait "$LOADGEN_PID" || status=$?
    LOADGEN_PID=""
    return "$status"
}
procinfo() { "$LOADGEN" procinfo "$@"; }

if ! loadgen --ready; then
    show_proxy_log 20
    exit 1
fi

FAILURES=()

# Prints every failure, the proxy's WARN/ERROR lines and its last lines, and exits 1.
fail_out() {
    echo
    for failure in "${FAILURES[@]}"; do
        echo "FAIL  $failure"
    done
    local warn
    warn="$(strip_colour "$WORK/proxy.log" | grep -E '^ ?[0-9TZ:.-]+ (WARN|ERROR) ' || true)"
    if [[ -n "$warn" ]]; then
        echo "==> the proxy's WARN/ERROR lines (first 20 of $(wc -l <<<"$warn"))"
        head -n 20 <<<"$warn" | sed -e 's/^/    /'
    fi
    if ! alive "$PROXY_PID"; then
        wait "$PROXY_PID" 2>/dev/null && echo "==> the proxy exited (status 0)" ||
            echo "==> the proxy exited (status $?)"
    fi
    show_proxy_log 40
    exit 1
}

# Runs one phase of the mix; $1 is its label, $2 its length in seconds.
run_phase() {
    local label="$1" seconds="$2" status=0
    echo "==> $label: $seconds s of the mix, $WORKERS workers"
    loadgen --label "$label" --seconds "$seconds" --seed "$RANDOM" \
        --progress 10 --json "$WORK/$label.json" || status=$?
    alive "$PROXY_PID" || {
        FAILURES+=("the proxy died during $label")
        return 1
    }
    local lost
    lost="$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["lost"]+s["unfinished"])' "$WORK/$label.json" 2>/dev/null || echo "?")"
    if [[ "$status" != 0 ]]; then
        FAILURES+=("$label: $lost requests lost or unfinished")
    fi
}

# Brings the upstream pool to one connection per worker, waits until the proxy is quiet, then
# reads it; sets the named variable to the snapshot.
reading() {
    local var="$1" label="$2" snap status=0
    if ! loadgen --fill; then
        FAILURES+=("pool fill before the $label reading: requests lost")
    fi
    snap="$(procinfo settle "$PROXY_PID" "$PROXY_PORT" "$MOCK_PORT" "$SETTLE" "$SETTLE_MAX")" || status=$?
    [[ -n "$snap" ]] || { FAILURES+=("no $label reading: the proxy is gone"); return 1; }
    if [[ "$status" != 0 ]]; then
        echo "    (not settled after ${SETTLE_MAX}s: client connections still open or fds changing)"
    fi
    printf -v "$var" '%s' "$snap"
    echo "    $label: $(procinfo describe "$snap")"
}

field() { grep -oE "(^| )$2=[^ ]*" <<<"$1" | cut -d= -f2 | tr -d "'"; }

run_phase warm-up "$WARMUP" || fail_out
START=""
reading START "start" || fail_out

CPU_TICK="$(getconf CLK_TCK)"
MOCK_TICKS_0="$(procinfo cpu-ticks "$MOCK_PID")"
run_phase soak "$SECONDS_RUN" || fail_out
MOCK_TICKS_1="$(procinfo cpu-ticks "$MOCK_PID" 2>/dev/null || echo "$MOCK_TICKS_0")"
END=""
reading END "end" || fail_out

# ----- report ---------------------------------------------------------------------------------

growth() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f", (b - a) * 100 / a }'; }
over_limit() { awk -v g="$1" -v m="$MAX_GROWTH" 'BEGIN { exit !(g > m) }'; }

rss0="$(field "$START" rss_kb)" rss1="$(field "$END" rss_kb)"
fds0="$(field "$START" fds)" fds1="$(field "$END" fds)"
rss_growth="$(growth "$rss0" "$rss1")"
fds_growth="$(growth "$fds0" "$fds1")"
over_limit "$rss_growth" && FAILURES+=("RSS grew by $rss_growth% (limit $MAX_GROWTH%)")
over_limit "$fds_growth" && FAILURES+=("open fds grew by $fds_growth% (limit $MAX_GROWTH%)")

soak_json="$WORK/soak.json"
summary_line="$(python3 - "$soak_json" "$(field "$START" cpu_ticks)" "$(field "$END" cpu_ticks)" \
    "$MOCK_TICKS_0" "$MOCK_TICKS_1" "$CPU_TICK" <<'EOF'
import json, os, sys
s = json.load(open(sys.argv[1]))
p0, p1, m0, m1, tick = map(int, sys.argv[2:])
# The proxy's CPU between the readings covers the run plus the settle time: near enough.
secs = s["seconds"] or 1
cores = os.cpu_count()
print(f'{s["sent"]} requests in {s["seconds"]:.1f}s = {s["rps"]:.0f} req/s; CPU in cores: '
      f'proxy {(p1 - p0) / tick / secs:.2f}, mock {(m1 - m0) / tick / secs:.2f}, '
      f'load generator {s["loadgen_cpu_core"]:.2f} (of {cores})')
if s["loadgen_cpu_core"] >= 0.9:
    print("    note: the load generator (one thread) used about a full core: the request "
          "rate above is its limit, not the proxy's")
EOF
)" || summary_line="(no figures: $soak_json unreadable)"

# The proxy's own view of the run: its access lines by status and outcome, and anything it
# logged above INFO.
access_summary="$(strip_colour "$WORK/proxy.log" | grep -oE 'status=[0-9]{3} .* outcome=[a-z_]+' |
    sed -E 's/ duration_ms=.* outcome=/ outcome=/' | sort | uniq -c | sort -rn |
    awk '{printf "%s%s %s=%d", sep, $2, $3, $1; sep=", "}' || true)"
warn_lines="$(strip_colour "$WORK/proxy.log" | grep -cE '^ ?[0-9TZ:.-]+ (WARN|ERROR) ' || true)"
# Every cancelled stream should appear as exactly one `status=200 ... outcome=client_gone` line.
client_gone="$(strip_colour "$WORK/proxy.log" | grep -cE 'status=200 .* outcome=client_gone' || true)"
cancelled="$(python3 -c 'import json,sys; print(sum(json.load(open(f))["kinds"]["cancelled"]["sent"] for f in sys.argv[1:]))' \
    "$WORK/warm-up.json" "$WORK/soak.json" 2>/dev/null || echo "?")"

echo
echo "==> soak report (proxy pid $PROXY_PID)"
printf '    %-6s %14s %14s %9s\n' "" start end growth
printf '    %-6s %11s kB %11s kB %8s%%\n' RSS "$rss0" "$rss1" "$rss_growth"
printf '    %-6s %11s kB %11s kB %8s%%\n' " anon" "$(field "$START" anon_kb)" "$(field "$END" anon_kb)" \
    "$(growth "$(field "$START" anon_kb)" "$(field "$END" anon_kb)")"
printf '    %-6s %11s kB %11s kB %8s%%\n' " file" "$(field "$START" file_kb)" "$(field "$END" file_kb)" \
    "$(growth "$(field "$START" file_kb)" "$(field "$END" file_kb)")"
printf '    %-6s %14s %14s %8s%%\n' fds "$fds0" "$fds1" "$fds_growth"
echo "    $summary_line"
if [[ "$LOG_LEVEL" == error ]]; then
    echo "    proxy access lines: none at LOG_LEVEL=error"
else
    echo "    proxy access lines, whole run (status outcome=count): ${access_summary:-none}"
    echo "    (malformed requests get hyper's 400 and no access line; pool fills and the readiness"
    echo "    probe add a few 200s)"
    echo "    cancelled streams sent: $cancelled; access lines with outcome=client_gone: $client_gone"
fi
echo "    proxy WARN/ERROR lines: $warn_lines"

((${#FAILURES[@]} == 0)) || fail_out
echo
echo "PASS  no request lost; RSS $rss_growth%, fds $fds_growth% (limit $MAX_GROWTH%)"
