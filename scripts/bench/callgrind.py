#!/usr/bin/env python3
"""Instruction counts of llm-proxy per plain request and per streamed chunk, under callgrind.

    python3 scripts/bench/callgrind.py [--proxy BIN] [--mock BIN] [--clients N] [--workers N]

Instruction counts do not depend on what else the machine is doing, so on a shared machine they
are the before/after evidence that timings cannot be. The release proxy runs under
`valgrind --tool=callgrind` (one tokio worker unless --workers) against the release mock
upstream; the counters are zeroed after a warm-up and dumped after each load:

  * plain: PLAIN_REQUESTS chat completions, one keep-alive connection, one at a time;
    instructions / requests;
  * stream: STREAMS SSE streams of SHORT and then of LONG chunks, STREAM_CONCURRENCY at a time
    (a connection each, kept alive); the difference of the two loads over the difference in
    chunks cancels the per-request cost: instructions per chunk.

--limited gives the benchmark's client the limits of the bench's "limited" target (every limit
set, none reached, and a model list). --clients N puts the token in a clients file of N clients (one is the benchmark's), to see how
the token lookup grows with the number of clients (the clients-file watcher, which runs on a
clock rather than per request, is left out of the counts). Python standard library only; prints
one JSON object. Needs valgrind (Debian package `valgrind`).
"""

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
TOKEN = "bench-client-token-6f1d"
KEY = "sk-bench-upstream-0c9a"
PLAIN_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def plain(port, count):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"}
    for _ in range(count):
        conn.request("POST", "/v1/chat/completions", PLAIN_BODY, headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit("plain request answered %d" % response.status)
    conn.close()


def streams(port, count, chunks, interval_ms, concurrency):
    headers = {
        "Authorization": "Bearer " + TOKEN,
        "Content-Type": "application/json",
        "x-mock-chunks": str(chunks),
        "x-mock-interval-ms": str(interval_ms),
    }
    left = [count]
    lock = threading.Lock()
    failures = []

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            conn.request("POST", "/v1/chat/completions", STREAM_BODY, headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or body.count(b"data:") < chunks:
                failures.append(response.status)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit("streams failed: %r" % failures[:5])


# The bench's "limited" client: every limit set, none reached, and a model list.
LIMITS = """requests_per_minute = 100000000
tokens_per_minute = 1000000000000
max_concurrent_requests = 100000
tokens_per_day = 1000000000000000
models = ["gpt-4o-*"]
"""


def clients_file(path, count, limited):
    with open(path, "w") as f:
        f.write('[clients.bench]\ntoken = "%s"\n' % TOKEN)
        if limited:
            f.write(LIMITS)
        for n in range(1, count):
            f.write('[clients.c%d]\ntoken = "client-token-%08d-padding"\n' % (n, n))


def background(path):
    """Instructions of the clients-file watcher, which runs on a clock (it hashes the file once a
    second), not per request: under valgrind's slowdown it would be counted many times over."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True).stdout
    costs = [int(m.group(1).replace(",", "")) for m in
             re.finditer(r"^\s*([\d,]+) .*ops::reload::Reloader::run", out, re.M)]
    return max(costs, default=0)


class Proxy:
    def __init__(self, binary, upstream_port, workdir, workers, clients, limited):
        self.port = free_port()
        self.out = os.path.join(workdir, "callgrind.out")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "TARGET_HOST": "http://127.0.0.1:%d" % upstream_port,
            "AUTH_BEARER": KEY,
            "PROXY_PORT": str(self.port),
            "PROXY_HOST": "127.0.0.1",
            "LOG_LEVEL": "info",
            "AUTH_VALIDATION": "true",
            "ALLOWED_TOKENS": TOKEN,
            # Both names: the binary before WORKER_THREADS only knew tokio's.
            "TOKIO_WORKER_THREADS": str(workers),
            "WORKER_THREADS": str(workers),
        }
        if clients:
            # A directory of its own (as a ConfigMap mount is): the proxy watches the file's
            # directory, and its log is written in the work dir.
            os.makedirs(os.path.join(workdir, "clients"))
            path = os.path.join(workdir, "clients", "clients.toml")
            clients_file(path, clients, limited)
            del env["ALLOWED_TOKENS"]
            env["CLIENTS_FILE"] = path
            env["STATE_DIR"] = os.path.join(workdir, "state")
        self.log = open(os.path.join(workdir, "proxy.log"), "wb")
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + self.out, binary],
            env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        if not wait_listening(self.port, self.proc):
            raise SystemExit("the proxy did not start (see %s)" % self.log.name)

    def control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def measure(self, load):
        """Instructions the proxy executed (all threads) while `load` ran."""
        self.control("-z")
        load()
        time.sleep(0.3)  # let the access lines of the last requests be written
        before = set(os.listdir(os.path.dirname(self.out)))
        self.control("-d")
        total = 0
        for name in sorted(set(os.listdir(os.path.dirname(self.out))) - before):
            if name.startswith("callgrind.out"):
                with open(os.path.join(os.path.dirname(self.out), name)) as f:
                    for line in f:
                        m = re.match(r"(?:summary|totals): (\d+)", line)
                        if m:
                            total += int(m.group(1))
                            break
                total -= background(os.path.join(os.path.dirname(self.out), name))
        return total

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", default=os.path.join(TARGET, "release", "llm-proxy"))
    parser.add_argument("--mock", default=os.path.join(TARGET, "release", "mock-upstream"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=0)
    parser.add_argument("--limited", action="store_true",
                        help="give the benchmark's client the bench's limits (implies --clients 1)")
    parser.add_argument("--plain", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=45)
    parser.add_argument("--interval-ms", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--skip", choices=["plain", "stream"], default=None)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="llm-proxy-callgrind-")
    mock_port = free_port()
    mock = subprocess.Popen([args.mock, "--port", str(mock_port), "--no-record"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_listening(mock_port, mock):
        raise SystemExit("mock-upstream did not start")
    clients = max(args.clients, 1) if args.limited else args.clients
    proxy = Proxy(args.proxy, mock_port, workdir, args.workers, clients, args.limited)
    result = {"proxy": args.proxy, "workers": args.workers, "clients": clients,
              "limited": args.limited}
    try:
        plain(proxy.port, 50)
        streams(proxy.port, args.concurrency, 2, args.interval_ms, args.concurrency)
        if args.skip != "plain":
            total = proxy.measure(lambda: plain(proxy.port, args.plain))
            result["plain_requests"] = args.plain
            result["instructions_per_request"] = round(total / args.plain)
        if args.skip != "stream":
            short = proxy.measure(lambda: streams(proxy.port, args.streams, args.short,
                                                  args.interval_ms, args.concurrency))
            long = proxy.measure(lambda: streams(proxy.port, args.streams, args.long,
                                                 args.interval_ms, args.concurrency))
            chunks = args.streams * (args.long - args.short)
            result["streams"] = args.streams
            result["instructions_per_stream_%d_chunks" % args.short] = round(short / args.streams)
            result["instructions_per_chunk"] = round((long - short) / chunks)
    finally:
        proxy.stop()
        mock.terminate()
        mock.wait()
    result["workdir"] = workdir
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
