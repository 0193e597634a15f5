#!/usr/bin/env bash
# The proxy's own errors read by the real OpenAI Python SDK: builds the proxy and the bundled mock
# upstream, starts the mock and four proxies in front of it on 127.0.0.1 (ERROR_FORMAT=openai and
# the default, each with the upstream from the environment, TARGET_HOST and AUTH_BEARER, and
# from a one-upstream UPSTREAMS_FILE), installs the pinned `openai` package from PyPI into a
# virtual environment of its own, and runs scripts/sdk_errors.py against each proxy: with openai,
# e.code, e.message and str(e) show the proxy's code and message; with the default the body is
# the unchanged shape; and the SDK sees the same with a one-upstream file as without one.
# One PASS/FAIL line per check; exits non-zero on any FAIL; always stops what it started.
#
#   scripts/sdk-errors.sh
#
# Needs: cargo, python3 with venv, PyPI. Debug build (shares `cargo test`'s artefacts).
# SDK_ERRORS_VENV: where the virtual environment is kept between runs (default: under TMPDIR).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib/processes.sh
source "$ROOT/scripts/lib/processes.sh"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
# Pinned: the checks read the SDK's exception attributes, which a new major version may rename.
OPENAI_VERSION="3.63.0"
VENV="${SDK_ERRORS_VENV:-${TMPDIR:-/tmp}/llm-proxy-sdk-errors-venv}"

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

echo "==> building llm-proxy and mock-upstream (debug)"
(cd "$ROOT" && cargo build -p llm-proxy -p mock-upstream --bin llm-proxy --bin mock-upstream)

echo "==> openai==$OPENAI_VERSION from PyPI into $VENV"
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" \
    2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "openai==$OPENAI_VERSION"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-proxy-sdk-errors.XXXXXX")"
MOCK_PID=""
PIDS=()

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do stop "$pid"; done
    stop "$MOCK_PID"
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$WORK/clients.toml" <<'EOF'
[clients.once]
token = "sdk-once"
requests_per_minute = 1

[clients.picky]
token = "sdk-picky"
models = ["gpt-allowed"]
EOF

echo "==> starting mock-upstream on 127.0.0.1"
mkdir "$WORK/mock"
start_mock "$WORK/mock" "$BIN" || exit 1

# The same mock as one upstream of an upstreams file serving every model, its key in a keys file.
printf '%s\n' "sk-sdk-errors-upstream-key" >"$WORK/upstream.keys"
cat >"$WORK/upstreams.toml" <<EOF
default = "mock"

[upstreams.mock]
base_url = "$MOCK_URL/v1"
keys_file = "$WORK/upstream.keys"
models = ["*"]
EOF

FAILED=0
for format in openai proxy; do
    for upstream in environment file; do
        echo "==> llm-proxy with ERROR_FORMAT=$format, the upstream from the $upstream"
        # Each proxy in a directory of its own: its log, no .env, its own STATE_DIR.
        mkdir "$WORK/$format-$upstream"
        settings=(
            AUTH_VALIDATION=true
            ALLOWED_TOKENS="sdk-client-token"
            CLIENTS_FILE="$WORK/clients.toml"
            STREAM_IDLE_TIMEOUT_SECS=1
        )
        # With the file, TARGET_HOST and AUTH_BEARER stay unset (start_proxy passes nothing else
        # from this shell): the proxy refuses a file together with either.
        if [[ "$upstream" == environment ]]; then
            settings+=(TARGET_HOST="$MOCK_URL" AUTH_BEARER="sk-sdk-errors-upstream-key")
        else
            settings+=(UPSTREAMS_FILE="$WORK/upstreams.toml")
        fi
        # The default is checked as it is met: ERROR_FORMAT unset.
        [[ "$format" == openai ]] && settings+=(ERROR_FORMAT=openai)
        start_proxy "$WORK/$format-$upstream" "$BIN" "${settings[@]}" || exit 1
        PIDS+=("$PROXY_PID")
        # Which upstream configuration the proxy took: /readyz names the upstreams of a file only.
        upstreams="$(python3 - "$PROXY_PORT" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=5) as answer:
    print(json.dumps(json.load(answer).get("upstreams")))
PY
)"
        expected=null
        [[ "$upstream" == file ]] && expected='{"mock": "closed"}'
        if [[ "$upstreams" == "$expected" ]]; then
            echo "PASS  $format, $upstream: /readyz upstreams $expected"
        else
            echo "FAIL  $format, $upstream: /readyz upstreams $upstreams, expected $expected"
            FAILED=1
        fi
        "$VENV/bin/python" "$ROOT/scripts/sdk_errors.py" "$format" \
            "http://127.0.0.1:$PROXY_PORT" "$upstream" || FAILED=1
    done
done

if [[ "$FAILED" != 0 ]]; then
    echo "sdk-errors: FAILED" >&2
    exit 1
fi
echo "sdk-errors: every check passed"
