#!/usr/bin/env python3
"""The OpenAI Python SDK reading a stream with `id:` lines through the proxy's SSE keep-alives.

Starts a small upstream that streams chat chunks carrying `id:` lines with a silence of a few
seconds before the content, starts the proxy in front of it with SSE_KEEPALIVE_SECS=1, and reads
the stream with `openai` (pip install openai): once with the upstream from the environment
(TARGET_BASE_URL, AUTH_BEARER), once from a one-upstream UPSTREAMS_FILE. Exits 0 when the SDK
got every chunk both times.

    cargo build && python3 scripts/openai_sdk_keepalive.py [path/to/llm-proxy]

With --control the upstream itself sends the keep-alive the way that breaks the SDK (a comment
followed by a blank line, openai-python #2722), to show what the proxy avoids: the SDK fails.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

SILENCE = 3.5  # seconds without a byte from the upstream, after the first event
CONTROL = "--control" in sys.argv


def chunk(n, content):
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-mock",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return f"id: {n}\ndata: {json.dumps(body)}\n\n".encode()


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def send(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        send(chunk(1, "Hel"))
        if CONTROL:
            time.sleep(0.2)
            send(b": ping\n\n")  # the shape that makes openai-python dispatch an empty event
        time.sleep(SILENCE)
        send(chunk(2, "lo"))
        send(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UPSTREAM_KEY = "sk-upstream-example"


def read_through_proxy(binary, upstream_url, configured_by):
    """Starts the proxy with the upstream `configured_by` the environment or a file, reads the
    stream through it with the SDK; the text read, or None when the SDK failed."""
    port = free_port()
    env = dict(os.environ, PROXY_HOST="127.0.0.1", PROXY_PORT=str(port),
               SSE_KEEPALIVE_SECS="1", LOG_LEVEL="error")
    # The proxy refuses a file together with an upstream from the environment: none is taken
    # from the caller's shell.
    for name in ("TARGET_HOST", "TARGET_BASE_URL", "AUTH_BEARER", "UPSTREAMS_FILE"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as work:
        if configured_by == "environment":
            env.update(TARGET_BASE_URL=upstream_url, AUTH_BEARER=UPSTREAM_KEY)
        else:
            keys = os.path.join(work, "keys")
            with open(keys, "w") as out:
                out.write(UPSTREAM_KEY + "\n")
            env["UPSTREAMS_FILE"] = os.path.join(work, "upstreams.toml")
            with open(env["UPSTREAMS_FILE"], "w") as out:
                out.write(f'default = "only"\n\n[upstreams.only]\nbase_url = "{upstream_url}"\n'
                          f'keys_file = "{keys}"\nmodels = ["*"]\n')
        proxy = subprocess.Popen([binary], env=env, cwd="/")
        version = f"openai {openai.__version__} ({configured_by})"
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            started = time.monotonic()
            stream = client.chat.completions.create(
                model="gpt-mock", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join(part.choices[0].delta.content or "" for part in stream)
            elapsed = time.monotonic() - started
        except Exception as err:  # the control run ends here
            print(f"{version}: the stream failed: {type(err).__name__}: {err}")
            return None
        finally:
            proxy.terminate()
            proxy.wait()
    print(f"{version}: got {text!r} after {elapsed:.1f}s of stream")
    return text


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    # Absolute: the proxy runs in / (no .env read), where a relative path would be looked up.
    binary = os.path.abspath(args[0] if args else os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "llm-proxy"
    ))
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstream_url = f"http://127.0.0.1:{upstream.server_port}/v1"
    try:
        texts = [read_through_proxy(binary, upstream_url, configured_by)
                 for configured_by in ("environment", "file")]
    finally:
        upstream.shutdown()
    return 0 if texts == ["Hello", "Hello"] else 1


if __name__ == "__main__":
    sys.exit(main())
