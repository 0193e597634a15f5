#!/usr/bin/env bash
# Benchmark: llm-proxy against nginx doing the same job, and against the upstream itself.
#
#   scripts/bench.sh            # about 7 minutes on a 2-core machine (plus the release build)
#
# One command, loopback only, every load bounded in count and time. It installs what it lacks
# (nginx, wrk and redis-server from Debian packages), builds the release binaries (the proxy, the mock upstream
# and tools/loadgen, whose `loadgen sse` is the streaming load generator; all in
# ${CARGO_TARGET_DIR:-target}/release), then runs `loadgen bench` (tools/loadgen/src/bench/),
# which measures side by side:
#   direct     -- load straight at mock-upstream (--no-record): the floor;
#   nginx      -- nginx as the equivalent proxy (token `map`, key swap, HTTP/1.1 keep-alive pool,
#                 proxy_buffering off; config from scripts/bench/nginx.conf.template);
#   proxy      -- target/release/llm-proxy with AUTH_VALIDATION=true, LOG_LEVEL=info, its log
#                 (access lines included) written to a file, as an operator would.
#   proxy-h2   -- "proxy" in front of a second mock-upstream in its TLS mode (--tls-self-signed,
#                 trusted through UPSTREAM_CA_FILE), offering h2 by ALPN as real providers do:
#                 memory and CPU per chunk through an HTTP/2 upstream (stream phases only).
#   quiet      -- "proxy" with LOG_LEVEL=error: no access line; proxy vs quiet is its cost.
#   routed     -- "proxy" with UPSTREAMS_FILE instead of TARGET_HOST/AUTH_BEARER: 3 upstreams
#                 (each the same mock, keys from a keys_file), 30 model patterns, 10 aliases, the
#                 benchmark's model in a tier weighted 3:1; next to "proxy", what routing by model
#                 costs per request and per streamed chunk (issue 19: at most +3%).
#   limited    -- the same binary with the token as a clients-file client (CLIENTS_FILE) with every
#                 limit set, none reached, and a model list: next to "proxy", the CPU a client's
#                 limits cost per request (body read for the model, charge, settlement).
#   priced     -- "limited" with dollar budgets and PRICES_FILE: a reservation before the call, the
#                 cost of the usage after it (issue 20: at most 2% over "limited")
#   shared     -- the same client with REDIS_URL: its limits kept in a redis-server started for the
#                 run (Debian package redis-server); next to "limited", what Redis adds per request
#                 (CPU of the proxy and the redis-server together, latency, script calls).
#   clients1   -- the token as a clients-file client without limits, alone in the file;
#   clients10k -- the same among 9,999 other clients (BENCH_CLIENTS): cost flat in the clients.
# Every llm-proxy gets MAX_CONCURRENT_REQUESTS above the largest stream count, so none is refused.
# Phases: footprint (start-up, idle RSS); plain requests (wrk) at c=1 and 32 for every target but
# proxy-h2; streams at 200 and 1000 (20 chunks 50 ms apart) and at 5000 (20 chunks 250 ms apart,
# about the same events per second as 1000) for direct, nginx, proxy and proxy-h2, and routed at
# 200 and 1000 too. limited and shared are not streamed (their cost is per request), to keep the
# run near 7 minutes.
# It prints a table with PASS/FAIL per target of issue 13 (INFO for figures only reported), how
# the cost grows from 200 to 5000 streams and from 1 to 10,000 clients, and writes JSON to
# target/bench/results.json.
# Exit status: non-zero only when the benchmark itself could not run, never for a missed target.
#
# Settings (environment):
#   BENCH_SECONDS=2              measured seconds of one plain run (wrk)
#   BENCH_ROUNDS=4               plain rounds per target and concurrency, targets interleaved
#   BENCH_WARMUP_SECONDS=1       unmeasured wrk run per target before each concurrency
#   BENCH_STREAM_SECONDS=6       seconds during which new streams start, per streaming run
#   BENCH_STREAM_ROUNDS=2        streaming rounds per target and concurrency, interleaved
#   BENCH_PLAIN_CONCURRENCY=1,32 BENCH_STREAM_CONCURRENCY=200,1000   ("none" skips the phase)
#   BENCH_CHUNKS=20 BENCH_INTERVAL_MS=50   the SSE stream the mock sends
#   BENCH_MANY_STREAMS=5000      the many-stream run(s) ("none" skips them), with chunks
#   BENCH_MANY_INTERVAL_MS=250   this far apart, in
#   BENCH_MANY_ROUNDS=1          rounds per target
#   BENCH_PLAIN_TARGETS=direct,nginx,quiet,proxy,routed,limited,priced,shared,clients1,clients10k
#                                (rows compared with each other run together in each round)
#   BENCH_STREAM_TARGETS=direct,nginx,proxy,routed,proxy-h2  BENCH_MANY_TARGETS=direct,nginx,proxy,proxy-h2
#                                which targets each phase measures ("none": none)
#   BENCH_CLIENTS=10000          clients in clients10k's file
#   BENCH_STARTUP_TRIES=10       fresh starts for start-up time and idle RSS
#   BENCH_PIN=split|none         CPU pinning, see below (default split)
#   BENCH_WORKERS=2              nginx worker_processes and llm-proxy's WORKER_THREADS
#   BENCH_PROXY_LOG=file|discard llm-proxy's stderr log to a file (default) or /dev/null
#   BENCH_ACCESS_LOG=file|off    nginx access_log (default file, for parity with the proxy's line)
#   BENCH_OUT=path               JSON output (default target/bench/results.json)
#   BENCH_SKIP_BUILD=1           use the binaries already in ${CARGO_TARGET_DIR:-target}/release
#   BENCH_NO_INSTALL=1           never call apt-get (fail if nginx or wrk is missing)
#   BENCH_KEEP_WORKDIR=1         keep the temp dir with configs and logs
#   BENCH_NICE=-10               scheduling weight of the benchmark's own session (autogroup)
#                                against other work on the machine; 0 leaves it alone
#   BENCH_PROXY_ENV="K=V ..."    extra environment for llm-proxy, for experiments
#                                (e.g. LD_PRELOAD=.../libjemalloc.so.2, MALLOC_ARENA_MAX=2)
#   BENCH_BASE_BIN=path          an older llm-proxy to compare with (unset: none): each target of
#                                BENCH_BASE_TARGETS in a phase's list gets a twin "base:<target>"
#                                from it, same environment and files, run next to it in every
#                                round; "Against the base binary" gives current/base per round
#                                (CPU per request and per chunk, peak RSS; idle RSS, start-up)
#   BENCH_BASE_TARGETS=proxy,quiet,limited,clients1,clients10k,proxy-h2
#                                the targets given a twin (llm-proxy targets the older binary runs)
# Defaults take about 7 minutes for the measurements on a 2-core machine: plain ~185 s, streams
# at 200 and 1000 ~150 s, 5000 streams ~50 s, footprint ~10 s (tools/loadgen/src/bench/mod.rs
# has the sum).
#
# Pinning (BENCH_PIN=split, the default). With 2 cores there is no clean answer; the choice:
#   CPU 0: the load generator alone (wrk -t1, or the single-threaded `loadgen sse`);
#   CPU 1: the mock upstreams (plain and TLS), the redis-server and the proxy under test (nginx
#          or llm-proxy; for "direct", the upstream alone).
# So the load generator never steals CPU from what it measures, every target shares one core with
# its upstream (req/s at c=32 reads as "one core of upstream + proxy"), and no core sits idle
# to be woken with an IPI for each event. Both proxies keep 2 workers, as deployed on this box:
# WORKER_THREADS=2 (tokio would otherwise size itself from the 1-CPU affinity mask) and
# nginx `worker_processes 2`. Caveats: the two workers time-share a core (any multi-worker
# overhead, e.g. tokio waking a second worker that finds nothing to do, is paid in full and shows
# as CPU time, but cross-core wake-up latency is not measured); and the absolute req/s are a
# 1-core figure. BENCH_PIN=none runs everything unpinned instead (closer to production, noisier).
#
# Noise: the targets run interleaved in rounds (order rotated each round), so a burst of outside
# load hits all of them alike; counts and CPU are pooled, percentiles are the median of the rounds,
# and a feature's CPU against its base row is the median of the two's ratio within each round.
# The benchmark's session gets a higher scheduling weight (BENCH_NICE), and each run records the
# CPU that other processes used meanwhile (column bg); the table warns when it was high.
#
# Logging parity: both proxies write one access line per request to a file, unbuffered (nginx's
# default combined format; llm-proxy's info-level access line through its logger on stderr).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
started=$(date +%s)

say() { printf '[bench] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# --- prerequisites ---------------------------------------------------------------------------
need_pkgs=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need_pkgs+=(wrk)
command -v taskset >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "${BENCH_NO_INSTALL:-}" = 1 ] && die "missing: ${need_pkgs[*]} (BENCH_NO_INSTALL=1)"
    command -v apt-get >/dev/null 2>&1 || die "missing ${need_pkgs[*]} and no apt-get to install them"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    say "installing ${need_pkgs[*]} (Debian packages)"
    $SUDO apt-get update -qq >/dev/null || die "apt-get update failed"
    # Keep the package from starting a system nginx on 0.0.0.0:80: Debian's policy-rc.d hook,
    # in place only for the install and only if the machine has none of its own.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy"
    fi
    install_rc=0
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need_pkgs[@]}" >/dev/null || install_rc=$?
    [ -n "$policy" ] && $SUDO rm -f "$policy"
    [ "$install_rc" -eq 0 ] || die "apt-get install ${need_pkgs[*]} failed"
fi
NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX_BIN" ] || die "nginx not found after install"
export BENCH_NGINX_BIN="$NGINX_BIN"

# --- build -----------------------------------------------------------------------------------
if [ "${BENCH_SKIP_BUILD:-}" != 1 ]; then
    say "building release binaries (lto=fat: a few minutes from scratch, quick when up to date)"
    cargo build --release --workspace --bin llm-proxy --bin mock-upstream --quiet \
        || die "cargo build failed"
    # Not a default member of the workspace, so named on its own.
    cargo build --release -p loadgen --quiet || die "cargo build -p loadgen failed"
fi
BIN="${CARGO_TARGET_DIR:-target}/release"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
for bin in llm-proxy mock-upstream loadgen; do
    [ -x "$BIN/$bin" ] || die "$BIN/$bin is missing"
done
# `loadgen bench` finds the binaries through these (it respects CARGO_TARGET_DIR too when run on
# its own).
export BENCH_PROXY_BIN="${BENCH_PROXY_BIN:-$BIN/llm-proxy}"
export BENCH_MOCK_BIN="${BENCH_MOCK_BIN:-$BIN/mock-upstream}"
export BENCH_LOADGEN_BIN="${BENCH_LOADGEN_BIN:-$BIN/loadgen}"
built=$(date +%s)

# --- limits ----------------------------------------------------------------------------------
# 5000 streams: 5000 client sockets in the generator, 5000 accepted plus 5000 upstream sockets in
# the proxy (over HTTP/1), 5000 more in the upstream; each process has its own limit.
want_nofile=20000
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_nofile" ]; then
    ulimit -n "$want_nofile" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
say "open files limit: $(ulimit -n)"

# --- run -------------------------------------------------------------------------------------
# `loadgen bench` moves itself into its own session (see BENCH_NICE), out of reach of the
# terminal's Ctrl-C: forward it.
"$BENCH_LOADGEN_BIN" bench --root "$ROOT" &
driver=$!
trap 'kill -INT "$driver" 2>/dev/null' INT TERM
rc=0
wait "$driver" || rc=$?
# A trapped signal interrupts the first wait; collect the real status.
if kill -0 "$driver" 2>/dev/null; then wait "$driver" || rc=$?; fi
trap - INT TERM
ended=$(date +%s)
say "build $((built - started)) s, benchmark $((ended - built)) s, total $((ended - started)) s"
exit "$rc"
