#!/usr/bin/env python3
"""Streaming load generator for scripts/bench.sh (Python 3 standard library only).

Keeps CONCURRENCY HTTP/1.1 keep-alive connections busy, each sending
`POST /v1/chat/completions` with `"stream": true` and the mock's
`x-mock-chunks` / `x-mock-interval-ms` headers, one stream after another until
DURATION seconds have passed (streams under way then run to their end; nothing
new starts). Connections open staggered over the first RAMP seconds so that
neither the listen backlog nor one synchronized burst of 1000 events every
interval distorts the figures.

Per stream it records, with time.perf_counter_ns() taken in the protocol's
data_received callback (so the loop's own scheduling delay is inside every
figure, the same for every target; "direct" is the floor it is compared to):
  * time to first chunk: request written -> first complete SSE event;
  * gaps between consecutive events, and the worst one;
  * the event count (must be CHUNKS + 3: role, CHUNKS contents, finish,
    [DONE]) and that the last event is `data: [DONE]`.
Anything else -- a non-200 status, a short or malformed stream, a reset -- is
an error. One JSON object goes to stdout at the end; `--pid` lets it sample
the RSS of the processes under test while the load runs.

Design note: asyncio Protocols (callbacks, no StreamReader, no per-event
coroutine switch) with a hand-rolled chunked/SSE parser whose common case is
one `data_received` = one HTTP chunk = one event. The generator reports its
own CPU use (`loadgen_cpu_util`, 1.0 = one core) so a run where it was the
bottleneck can be seen as such.
"""

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import socket
import sys
import time

now_ns = time.perf_counter_ns


class Stats:
    def __init__(self):
        self.ttfc_ns = []
        self.gap_max_ns = []  # worst gap per stream
        self.gaps_ns = []  # every gap (for p99)
        self.streams_ok = 0
        self.events = 0
        self.events_all = 0  # failed streams' events too: what the proxy forwarded
        self.errors = 0
        self.non_2xx = 0
        self.error_kinds = {}
        self.bytes = 0

    def error(self, kind):
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class StreamClient(asyncio.Protocol):
    """One keep-alive connection running streams back to back."""

    def __init__(self, request, expected_events, deadline_ns, stats, done):
        self.request = request
        self.expected = expected_events
        self.deadline = deadline_ns
        self.stats = stats
        self.done = done
        self.transport = None
        self.closed = False
        self.in_stream = False
        self.skip = 0

    # --- connection ---------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.start_stream()

    def connection_lost(self, exc):
        self.closed = True
        if self.in_stream:
            self.stats.error("connection_lost" if exc is None else "reset")
            self.in_stream = False
        if not self.done.done():
            self.done.set_result(None)

    # --- one stream ---------------------------------------------------
    def start_stream(self):
        self.in_stream = True
        self.buf = b""
        self.head_done = False
        self.chunk_left = 0  # bytes left of the current HTTP chunk body
        self.chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data
        self.sse = b""
        self.events = 0
        self.last_event = b""
        self.first_ns = 0
        self.prev_ns = 0
        self.gap_max = 0
        self.gaps = []
        self.sent_ns = now_ns()
        self.transport.write(self.request)

    def fail(self, kind):
        self.stats.error(kind)
        self.in_stream = False
        self.transport.close()

    def data_received(self, data):
        t = now_ns()
        self.stats.bytes += len(data)
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
            if not data:
                return
        if not self.in_stream:
            self.fail("unexpected_data")
            return
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.fail("header_too_long")
                return
            head = self.buf[:end].decode("latin-1")
            data = self.buf[end + 4 :]
            self.buf = b""
            self.head_done = True
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                self.fail("bad_status_line")
                return
            status = int(parts[1])
            if not 200 <= status < 300:
                self.stats.non_2xx += 1
                self.fail("status_%d" % status)
                return
            lower = head.lower()
            if "transfer-encoding: chunked" not in lower:
                self.fail("not_chunked")
                return
            if not data:
                return
        self.feed_chunked(data, t)

    def feed_chunked(self, data, t):
        # Common case first: the whole of one or more chunks in `data`.
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        payload = []
        while pos < n:
            st = self.chunk_state
            if st == 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self.buf = buf[pos:]
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self.fail("bad_chunk_size")
                    return
                pos = eol + 2
                if size == 0:
                    # Last chunk: expect the final CRLF (no trailers here).
                    rest = buf[pos:]
                    if rest == b"\r\n"[: len(rest)]:
                        # The final CRLF may still be in flight (never seen in
                        # practice): skip what is missing of it next time.
                        self.skip = 2 - len(rest)
                        self.flush_payload(payload, t)
                        self.finish_stream()
                        return
                    self.fail("trailers")
                    return
                self.chunk_left = size
                self.chunk_state = 1
            elif st == 1:
                take = min(self.chunk_left, n - pos)
                payload.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_state = 2
            else:
                if n - pos < 2:
                    self.buf = buf[pos:]
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    self.fail("bad_chunk_end")
                    return
                pos += 2
                self.chunk_state = 0
        self.flush_payload(payload, t)

    def flush_payload(self, payload, t):
        if not payload:
            return
        sse = self.sse + b"".join(payload) if self.sse else b"".join(payload)
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            self.last_event = sse[start:end]
            start = end + 2
            self.events += 1
            self.stats.events_all += 1
            if self.events == 1:
                self.first_ns = t
            else:
                gap = t - self.prev_ns
                self.gaps.append(gap)
                if gap > self.gap_max:
                    self.gap_max = gap
            self.prev_ns = t
        self.sse = sse[start:]

    def finish_stream(self):
        stats = self.stats
        self.in_stream = False
        if self.events != self.expected:
            self.stats.error("events_%d_of_%d" % (self.events, self.expected))
        elif self.last_event != b"data: [DONE]":
            self.stats.error("no_done")
        elif self.sse:
            self.stats.error("trailing_bytes")
        else:
            stats.streams_ok += 1
            stats.events += self.events
            stats.ttfc_ns.append(self.first_ns - self.sent_ns)
            stats.gap_max_ns.append(self.gap_max)
            stats.gaps_ns.extend(self.gaps)
        if self.closed:
            return
        if now_ns() < self.deadline:
            self.start_stream()
        else:
            self.transport.close()


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def read_rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


async def sample_rss(pids, stop, out):
    while not stop.is_set():
        total = sum(read_rss_kb(p) for p in pids)
        if total > out["max_kb"]:
            out["max_kb"] = total
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


async def main_async(args):
    loop = asyncio.get_running_loop()
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello in twenty words."}],
        },
        separators=(",", ":"),
    ).encode()
    headers = [
        "POST %s HTTP/1.1" % args.path,
        "Host: %s:%d" % (args.host, args.port),
        "Content-Type: application/json",
        "Accept: text/event-stream",
        "Content-Length: %d" % len(body),
        "x-mock-chunks: %d" % args.chunks,
        "x-mock-interval-ms: %d" % args.interval_ms,
    ]
    if args.token:
        headers.append("Authorization: Bearer %s" % args.token)
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
    expected = args.chunks + 3

    stats = Stats()
    start_ns = now_ns()
    deadline = start_ns + int(args.duration * 1e9)
    rss = {"max_kb": 0}
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(args.pid, stop, rss)) if args.pid else None
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()

    rng = random.Random(42)
    offsets = sorted(rng.uniform(0, args.ramp) for _ in range(args.concurrency))
    dones = []
    connect_errors = 0

    async def one(offset):
        nonlocal connect_errors
        delay = start_ns / 1e9 + offset - now_ns() / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        done = loop.create_future()
        try:
            await loop.create_connection(
                lambda: StreamClient(request, expected, deadline, stats, done),
                args.host,
                args.port,
            )
        except OSError as err:
            connect_errors += 1
            stats.error("connect_%s" % type(err).__name__)
            return
        try:
            await asyncio.wait_for(done, args.duration + args.grace)
        except asyncio.TimeoutError:
            stats.error("timeout")

    gc.disable()  # short-lived run; keeps collector pauses out of the gaps
    await asyncio.gather(*(one(o) for o in offsets))
    gc.enable()
    wall = time.monotonic() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if sampler:
        stop.set()
        await sampler

    ttfc = sorted(stats.ttfc_ns)
    gmax = sorted(stats.gap_max_ns)
    gaps = sorted(stats.gaps_ns)
    us = lambda v: None if v is None else v / 1000.0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result = {
        "concurrency": args.concurrency,
        "chunks": args.chunks,
        "interval_ms": args.interval_ms,
        "duration_s": round(wall, 3),
        "streams_ok": stats.streams_ok,
        "events": stats.events,
        "events_all": stats.events_all,
        "content_chunks": stats.streams_ok * args.chunks,
        "bytes": stats.bytes,
        "errors": stats.errors,
        "non_2xx": stats.non_2xx,
        "error_kinds": stats.error_kinds,
        "ttfc_us": {
            "p50": us(percentile(ttfc, 50)),
            "p90": us(percentile(ttfc, 90)),
            "p99": us(percentile(ttfc, 99)),
            "max": us(ttfc[-1] if ttfc else None),
        },
        "gap_ms": {
            "p50": None if not gaps else percentile(gaps, 50) / 1e6,
            "p99": None if not gaps else percentile(gaps, 99) / 1e6,
            "p999": None if not gaps else percentile(gaps, 99.9) / 1e6,
            "max": None if not gmax else gmax[-1] / 1e6,
            "worst_per_stream_p50": None if not gmax else percentile(gmax, 50) / 1e6,
        },
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_util": round(cpu / wall, 3) if wall > 0 else None,
        "peak_rss_sampled_kb": rss["max_kb"] if args.pid else None,
    }
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--token", default=os.environ.get("BENCH_CLIENT_TOKEN", ""))
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0, help="seconds during which new streams start")
    p.add_argument("--ramp", type=float, default=1.0, help="seconds over which connections open")
    p.add_argument("--grace", type=float, default=30.0, help="extra seconds before a stream counts as hung")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--interval-ms", type=int, default=50)
    p.add_argument("--pid", type=int, action="append", default=[], help="sample this process's RSS (repeatable)")
    args = p.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.concurrency + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
