# shellcheck shell=bash
# Helpers shared by scripts/smoke.sh and scripts/soak.sh (sourced, not run): stopping a process,
# waiting for a log line, and starting the mock upstream and the proxy the same way in both.

# stop PID: SIGTERM, up to 5 s to exit, then SIGKILL; a PID that is empty or gone is fine.
stop() {
    local pid="$1"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# wait_for_line FILE PATTERN SECONDS PID: prints the first line of FILE matching the extended
# regex PATTERN; fails after SECONDS or as soon as PID has exited.
wait_for_line() {
    local file="$1" pattern="$2" seconds="$3" pid="$4" line
    for _ in $(seq $((seconds * 10))); do
        # Colour codes are stripped in case the logger decided it writes to a terminal.
        line="$(sed -e 's/\x1b\[[0-9;]*m//g' "$file" 2>/dev/null | grep -m1 -E "$pattern" || true)"
        if [[ -n "$line" ]]; then
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_mock WORK BIN [ARG...]: starts BIN/mock-upstream on 127.0.0.1, on a port the kernel picks,
# in the directory WORK (stdout to WORK/mock.out, stderr to WORK/mock.err), with any extra ARGs
# (e.g. --no-record). Sets MOCK_PID, MOCK_URL (http://127.0.0.1:PORT) and MOCK_PORT and prints
# the mock's listening line; fails, after printing its output, if it does not start in 10 s.
start_mock() {
    local work="$1" bin="$2" line
    shift 2
    (cd "$work" && exec "$bin/mock-upstream" --host 127.0.0.1 --port 0 "$@") \
        >"$work/mock.out" 2>"$work/mock.err" </dev/null &
    MOCK_PID=$!
    if ! line="$(wait_for_line "$work/mock.out" '^mock-upstream listening on http://127\.0\.0\.1:[0-9]+$' 10 "$MOCK_PID")"; then
        echo "mock-upstream did not start:" >&2
        cat "$work/mock.out" "$work/mock.err" >&2
        return 1
    fi
    MOCK_URL="${line#mock-upstream listening on }"
    MOCK_PORT="${MOCK_URL##*:}"
    echo "    $line"
}

# start_proxy WORK BIN [VAR=VALUE...]: starts BIN/llm-proxy in the directory WORK (stdout to
# WORK/proxy.out, its log on stderr to WORK/proxy.log) on a port the kernel picks. Its
# environment is PATH, NO_PROXY for loopback, PROXY_PORT=0 and the VAR=VALUE settings given, and
# nothing else: nothing from the caller's shell (proxies, other limits) leaks into the run, and
# WORK is meant to be an empty directory, so no .env file is read either. Sets PROXY_PID and
# PROXY_PORT and PROXY_LISTEN (the address part of its "listening on" line); fails, after
# printing its log, if it does not start in 10 s.
start_proxy() {
    local work="$1" bin="$2" line
    shift 2
    (
        cd "$work"
        exec env -i PATH="$PATH" NO_PROXY="127.0.0.1,localhost" PROXY_PORT=0 "$@" "$bin/llm-proxy"
    ) >"$work/proxy.out" 2>"$work/proxy.log" </dev/null &
    PROXY_PID=$!
    if ! line="$(wait_for_line "$work/proxy.log" 'listening on [0-9.]+:[0-9]+' 10 "$PROXY_PID")"; then
        echo "llm-proxy did not start:" >&2
        cat "$work/proxy.log" >&2
        return 1
    fi
    PROXY_LISTEN="$(grep -oE 'listening on [0-9.]+:[0-9]+' <<<"$line")"
    PROXY_PORT="${PROXY_LISTEN##*:}"
}
