#!/usr/bin/env bash
# Smoke test and demo: builds the proxy and the bundled mock upstream, starts both on 127.0.0.1,
# runs the README's curl calls against the proxy and prints what each returned, one PASS/FAIL
# line per step. Exits non-zero on any mismatch; always stops what it started.
#
#   scripts/smoke.sh                      # release build (the default)
#   SMOKE_PROFILE=debug scripts/smoke.sh  # debug build: compiles faster, shares `cargo test`'s artefacts
#
# Release is the default because this is the demo of the binary people deploy; its first build
# takes a few minutes (fat LTO, one codegen unit), later runs only relink what changed.
# Needs: cargo, curl. Works without a TTY and with CI=true.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/processes.sh
source "$ROOT/scripts/lib/processes.sh"
PROFILE="${SMOKE_PROFILE:-release}"
case "$PROFILE" in
    release) PROFILE_FLAG=(--release) ;;
    debug) PROFILE_FLAG=() ;;
    *) echo "SMOKE_PROFILE must be release or debug, not '$PROFILE'" >&2; exit 2 ;;
esac
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"

# Made-up credentials for the demo: the mock upstream accepts any key.
UPSTREAM_KEY="sk-smoke-upstream-key"
CLIENT_TOKEN="smoke-client-token"
ADMIN_TOKEN="smoke-admin-token"

command -v curl >/dev/null || { echo "smoke.sh needs curl" >&2; exit 2; }

# Talk to 127.0.0.1 directly even if the caller's shell sets an HTTP proxy (curl and the
# proxy's upstream client both honour these variables).
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

echo "==> building llm-proxy and mock-upstream ($PROFILE)"
(cd "$ROOT" && cargo build "${PROFILE_FLAG[@]}" -p llm-proxy -p mock-upstream \
    --bin llm-proxy --bin mock-upstream)

# Both processes run in an empty temporary directory, so no .env or .env.local is read, and the
# proxy gets a clean environment (start_proxy in scripts/lib/processes.sh).
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-proxy-smoke.XXXXXX")"
MOCK_PID=""
PROXY_PID=""

cleanup() {
    local status=$?
    stop "$PROXY_PID"
    stop "$MOCK_PID"
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

FAILURES=0
pass() { printf 'PASS  %s\n' "$1"; }
fail() {
    printf 'FAIL  %s: %s\n' "$1" "$2"
    FAILURES=$((FAILURES + 1))
}

echo "==> starting mock-upstream on 127.0.0.1"
start_mock "$WORK" "$BIN" || exit 1

echo "==> starting llm-proxy in front of it"
start_proxy "$WORK" "$BIN" \
    TARGET_HOST="$MOCK_URL" \
    AUTH_BEARER="$UPSTREAM_KEY" \
    LOG_LEVEL=info \
    DEBUG_MODE=false \
    AUTH_VALIDATION=true \
    ALLOWED_TOKENS="$CLIENT_TOKEN" \
    DEFAULT_AUTH_HEADER=Authorization \
    ADMIN_TOKEN="$ADMIN_TOKEN" || exit 1
PROXY="http://127.0.0.1:$PROXY_PORT"
echo "    $PROXY_LISTEN -> $PROXY"

# Ready once it answers HTTP at all; an unknown path gives the proxy's own 404 without
# touching the upstream (and without warming the models cache).
ready=""
for _ in $(seq 50); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' "$PROXY/" 2>/dev/null || true)" == 404 ]]; then
        ready=yes
        break
    fi
    sleep 0.1
done
if [[ -z "$ready" ]]; then
    echo "llm-proxy does not answer on $PROXY:" >&2
    cat "$WORK/proxy.log" >&2
    exit 1
fi

HEADERS="$WORK/headers"
BODY="$WORK/body"
STATUS=""

# Runs curl with the given arguments; sets STATUS and leaves headers and body in their files.
call() {
    echo
    printf '$ curl'
    local arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then printf ' %s' "$arg"; else printf " '%s'" "$arg"; fi
    done
    printf '\n'
    STATUS="$(curl -sS --max-time 20 -D "$HEADERS" -o "$BODY" -w '%{http_code}' "$@")" || STATUS="curl-failed"
    tr -d '\r' <"$HEADERS" >"$HEADERS.txt" 2>/dev/null || : >"$HEADERS.txt"
    echo "-> HTTP $STATUS"
}

# The value of response header $1 (case-insensitive), empty if absent.
header() {
    grep -i -m1 "^$1:" "$HEADERS.txt" | sed -E 's/^[^:]+:[[:space:]]*//' || true
}

show_header() {
    local value
    value="$(header "$1")"
    [[ -n "$value" ]] && echo "   $1: $value"
    return 0
}

show_body() {
    sed -e 's/^/   /' "$BODY"
    [[ -z "$(tail -c1 "$BODY")" ]] || echo
}

CHAT_BODY='{"model":"gpt-mock","messages":[{"role":"user","content":"Hello"}]}'
STREAM_BODY='{"model":"gpt-mock","stream":true,"messages":[{"role":"user","content":"Hello"}]}'
TIME_RE='[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z'
UNAUTHORIZED_RE="^\\{\"error\":\"unauthorized\",\"message\":\"Invalid or missing authorization token\",\"time\":\"$TIME_RE\"\\}\$"

# 1. A plain chat completion.
step="chat completion"
call -X POST "$PROXY/v1/chat/completions" \
    -H "Content-Type: application/json" \
    -H "Authorization: Bearer $CLIENT_TOKEN" \
    -d "$CHAT_BODY"
show_header x-request-id
show_body
if [[ "$STATUS" != 200 ]]; then
    fail "$step" "expected HTTP 200, got $STATUS"
elif ! grep -qF '"content":"Hello from the mock upstream."' "$BODY"; then
    fail "$step" "the reply does not contain \"Hello from the mock upstream.\""
else
    pass "$step"
fi

# 2. The same, streamed: -N prints each server-sent event as it arrives.
step="chat completion, streamed"
call -N -X POST "$PROXY/v1/chat/completions" \
    -H "Content-Type: application/json" \
    -H "Authorization: Bearer $CLIENT_TOKEN" \
    -d "$STREAM_BODY"
show_header content-type
show_body
events="$(grep -c '^data: ' "$BODY" || true)"
last="$(grep '^data: ' "$BODY" | tail -n1 || true)"
if [[ "$STATUS" != 200 ]]; then
    fail "$step" "expected HTTP 200, got $STATUS"
elif [[ "$(header content-type)" != text/event-stream* ]]; then
    fail "$step" "expected content-type text/event-stream, got '$(header content-type)'"
elif ((events < 3)); then
    fail "$step" "expected several 'data:' events, got $events"
elif [[ "$last" != "data: [DONE]" ]]; then
    fail "$step" "the stream does not end with 'data: [DONE]'"
else
    pass "$step ($events events, ends with [DONE])"
fi

# 3.-4. The model list: fetched from the upstream once, then served from the cache.
models() {
    step="$1"
    call "$PROXY/v1/models" -H "Authorization: Bearer $CLIENT_TOKEN"
    show_header x-proxy-cache
    show_body
    if [[ "$STATUS" != 200 ]]; then
        fail "$step" "expected HTTP 200, got $STATUS"
    elif [[ "$(header x-proxy-cache)" != "$2" ]]; then
        fail "$step" "expected x-proxy-cache: $2, got '$(header x-proxy-cache)'"
    elif ! grep -qF '"object":"list"' "$BODY"; then
        fail "$step" "the body is not a model list"
    else
        pass "$step (x-proxy-cache: $2)"
    fi
}
models "models, first call" MISS
models "models, second call" HIT

# 5. The admin clears the cache...
step="admin cache clear"
call -X POST "$PROXY/admin/cache/clear" -H "Authorization: Bearer $ADMIN_TOKEN"
show_body
if [[ "$STATUS" != 200 ]]; then
    fail "$step" "expected HTTP 200, got $STATUS"
elif ! grep -qE "^\\{\"message\":\"models cache cleared\",\"time\":\"$TIME_RE\"\\}\$" "$BODY"; then
    fail "$step" "unexpected body"
else
    pass "$step"
fi

# 6. ...so the next call goes to the upstream again.
models "models after the clear" MISS

# 7. No token: the proxy's own 401, in its JSON error shape.
step="chat without a token"
call -X POST "$PROXY/v1/chat/completions" \
    -H "Content-Type: application/json" \
    -d "$CHAT_BODY"
show_header www-authenticate
show_body
if [[ "$STATUS" != 401 ]]; then
    fail "$step" "expected HTTP 401, got $STATUS"
elif ! [[ "$(cat "$BODY")" =~ $UNAUTHORIZED_RE ]]; then
    fail "$step" "expected exactly {\"error\":\"unauthorized\",\"message\":\"Invalid or missing authorization token\",\"time\":\"<RFC 3339>\"}"
elif [[ "$(header www-authenticate)" != Bearer ]]; then
    fail "$step" "expected WWW-Authenticate: Bearer"
else
    pass "$step (401, error/message/time)"
fi

# 8. A client token does not open the admin route.
step="admin cache clear with a client token"
call -X POST "$PROXY/admin/cache/clear" -H "Authorization: Bearer $CLIENT_TOKEN"
show_body
if [[ "$STATUS" != 401 ]]; then
    fail "$step" "expected HTTP 401, got $STATUS"
elif ! [[ "$(cat "$BODY")" =~ $UNAUTHORIZED_RE ]]; then
    fail "$step" "unexpected body"
else
    pass "$step (401)"
fi

# 9. SIGTERM: the proxy drains (nothing is in flight here) and exits 0.
echo
echo "\$ kill -TERM <llm-proxy>"
step="graceful shutdown"
kill -TERM "$PROXY_PID"
code=""
for _ in $(seq 100); do
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
        code=0
        wait "$PROXY_PID" || code=$?
        break
    fi
    sleep 0.1
done
PROXY_PID_STOPPED="$PROXY_PID"
PROXY_PID=""
if [[ -z "$code" ]]; then
    PROXY_PID="$PROXY_PID_STOPPED"
    fail "$step" "still running 10 s after SIGTERM"
elif [[ "$code" != 0 ]]; then
    fail "$step" "exit code $code, expected 0"
else
    pass "$step (exit 0)"
fi

echo
echo "==> the proxy's log (stderr)"
sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/   /' "$WORK/proxy.log"

# 10. Whatever happened above, no secret may appear in the log.
step="no secret in the proxy's log"
leaked=""
for secret in "$UPSTREAM_KEY" "$CLIENT_TOKEN" "$ADMIN_TOKEN"; do
    if grep -qF "$secret" "$WORK/proxy.log"; then
        leaked="$leaked $secret"
    fi
done
access_lines="$(grep -cE ' status=[0-9]{3} duration_ms=' "$WORK/proxy.log" || true)"
if [[ -n "$leaked" ]]; then
    fail "$step" "found:$leaked"
elif ((access_lines < 8)); then
    fail "$step" "expected an access line per request, found $access_lines"
else
    pass "$step ($access_lines access lines)"
fi

echo
if ((FAILURES > 0)); then
    echo "smoke: $FAILURES step(s) FAILED"
    exit 1
fi
echo "smoke: all steps passed"
