# shellcheck shell=bash
# Helpers shared by scripts/smoke.sh and scripts/soak.sh (sourced, not run).

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
