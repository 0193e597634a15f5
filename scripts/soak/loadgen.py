#!/usr/bin/env python3
"""Mixed-load generator for scripts/soak.sh (Python 3 standard library only).

Runs WORKERS asyncio tasks against the proxy on 127.0.0.1 (and nowhere else: any other host is
refused), each picking one request kind at a time from a fixed weighted mix until SECONDS have
passed (or MAX_REQUESTS were started); requests under way then finish, each bounded by TIMEOUT.
Raw HTTP/1.1 over asyncio streams; keep-alive where a real client would keep the connection
(each worker keeps one, and drops it after KEEPALIVE_IDLE_S idle, before the proxy would).

Every request has an expected outcome, checked in full:

  plain       POST /v1/chat/completions              200, complete JSON body with "choices"
  stream      same with "stream": true               200, every SSE event, ends `data: [DONE]`
  cancelled   a 10 s stream, closed abruptly         200 and the first event, then the socket is
                                                     closed (RST half the time, FIN otherwise)
  over_decl   Content-Length > MAX_BODY_BYTES, then  413 `payload_too_large` (fresh connection)
              nothing, 16 kB of it, or nothing after
              `Expect: 100-continue`
  over_chunk  chunked body > MAX_BODY_BYTES          413 `payload_too_large` (fresh connection)
  no_token    POST/GET without or with a bad token   401 `unauthorized` (keep-alive)
  malformed   two Content-Lengths, a garbage request 400, then the connection is closed
              line, a header line without a colon
  models      GET /v1/models                         200, JSON with "data" (keep-alive)

A request is lost when it times out, gets no (or a cut-off) response, a wrong status or a body
that does not match. Per kind: sent, ok, lost and the reasons; the first few losses are kept
with their time and what came back, to be matched against the proxy's log.

The per-kind table goes to stdout; `--json FILE` also writes the figures as JSON. Exit status:
0 when nothing was lost, 1 when something was, 2 on a usage error.

Two short modes for soak.sh: `--ready` (one chat request, retried until it works) and `--fill`
(WORKERS overlapping chat requests, which leave one pooled upstream connection per worker).
"""

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import socket
import struct
import sys
import time

ONLY_HOST = "127.0.0.1"

# kind -> weight in the mix (relative).
MIX = {
    "plain": 30,
    "stream": 18,
    "cancelled": 10,
    "over_decl": 7,
    "over_chunk": 6,
    "no_token": 10,
    "malformed": 7,
    "models": 12,
}
KINDS = list(MIX)

STREAM_CHUNKS = 20  # content events in a streamed answer: role + 20 + finish + [DONE]
STREAM_INTERVAL_MS = 2
CANCEL_CHUNKS = 2000  # long enough (2000 x 5 ms = 10 s) that it is always cut by the client
CANCEL_INTERVAL_MS = 5
KEEPALIVE_IDLE_S = 4.0  # below the proxy's HEADER_READ_TIMEOUT_SECS, which also bounds idleness
MAX_SAMPLES = 8  # lost requests kept in full per kind (in the JSON)
PRINTED_SAMPLES = 3  # and printed


class Lost(Exception):
    """The request did not get the answer it expects; args[0] is a short reason."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class Response:
    __slots__ = ("status", "headers", "body", "raw_head")

    def __init__(self, status, headers, body, raw_head):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name):
        return self.headers.get(name, "")

    def wants_close(self):
        return "close" in self.header("connection").lower()

    def describe(self):
        return f"(status {self.status}) {self.body[:160]!r}"


class Conn:
    """One client connection to the proxy."""

    __slots__ = ("reader", "writer", "last_used", "uses")

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()
        self.uses = 0

    def usable(self):
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.last_used < KEEPALIVE_IDLE_S
        )

    def abort(self, reset=False):
        """Closes at once, without waiting; `reset` sends an RST instead of a FIN."""
        transport = self.writer.transport
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        transport.abort()


class Slot:
    """A worker's kept-alive connection, None until one is open."""

    __slots__ = ("conn",)

    def __init__(self):
        self.conn = None


class Generator:
    def __init__(self, args):
        self.args = args
        self.port = args.port
        self.host_header = f"Host: {ONLY_HOST}:{args.port}\r\n".encode()
        self.auth = f"Authorization: Bearer {args.token}\r\n".encode()
        self.max_body = args.max_body
        self.sent = collections.Counter()
        self.ok = collections.Counter()
        self.lost = collections.Counter()
        self.reasons = collections.defaultdict(collections.Counter)
        self.samples = collections.defaultdict(list)
        self.latency_sum = collections.Counter()
        self.latency_max = collections.defaultdict(float)
        self.keepalive_reconnects = 0  # kept connections found closed by the proxy before reuse
        self.connections = 0
        self.started_total = 0
        self.stop_at = 0.0
        self.t0 = 0.0
        self.wall0 = 0.0

        plain = json.dumps(
            {"model": "gpt-mock", "messages": [{"role": "user", "content": "soak: say hello"}]}
        ).encode()
        stream = json.dumps(
            {
                "model": "gpt-mock",
                "stream": True,
                "messages": [{"role": "user", "content": "soak: stream"}],
            }
        ).encode()
        json_h = b"Content-Type: application/json\r\n"
        self.req_plain = self.request(b"POST", b"/v1/chat/completions", json_h, plain)
        self.req_stream = self.request(
            b"POST",
            b"/v1/chat/completions",
            json_h
            + f"x-mock-chunks: {STREAM_CHUNKS}\r\nx-mock-interval-ms: {STREAM_INTERVAL_MS}\r\n".encode(),
            stream,
        )
        self.req_cancel = self.request(
            b"POST",
            b"/v1/chat/completions",
            json_h
            + f"x-mock-chunks: {CANCEL_CHUNKS}\r\nx-mock-interval-ms: {CANCEL_INTERVAL_MS}\r\n".encode(),
            stream,
        )
        self.req_models = self.request(b"GET", b"/v1/models", b"", None)
        self.stream_events = STREAM_CHUNKS + 3

    def request(self, method, path, extra, body, auth=True):
        head = method + b" " + path + b" HTTP/1.1\r\n" + self.host_header
        if auth:
            head += self.auth
        head += extra
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        return head + b"\r\n" + (body or b"")

    # ----- connections --------------------------------------------------------------------

    async def connect(self):
        # The only place a socket is opened, and it is always to 127.0.0.1.
        reader, writer = await asyncio.open_connection(ONLY_HOST, self.port, limit=1 << 20)
        sock = writer.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        return Conn(reader, writer)

    # ----- HTTP/1.1 response parsing ------------------------------------------------------

    async def read_head(self, reader):
        """Status and headers of the next final response (1xx are skipped)."""
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    raise Lost("cut in headers", repr(err.partial[:160]))
                raise Lost("eof before status")
            except asyncio.LimitOverrunError:
                raise Lost("headers too long")
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise Lost("bad status line", lines[0][:160])
            status = int(parts[1])
            headers = {}
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            if 100 <= status < 200:
                continue
            return status, headers, raw

    async def read_chunk(self, reader):
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Lost("bad chunk size", repr(line[:80]))
        if size == 0:
            # Trailers, then the empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b""
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise Lost("bad chunk end")
        return data[:-2]

    async def read_response(self, reader, method=b"POST"):
        status, headers, raw = await self.read_head(reader)
        try:
            if method == b"HEAD" or status in (204, 304):
                body = b""
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                parts = []
                while True:
                    chunk = await self.read_chunk(reader)
                    if not chunk:
                        break
                    parts.append(chunk)
                body = b"".join(parts)
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()  # delimited by the end of the connection
        except asyncio.IncompleteReadError as err:
            raise Lost("truncated body", f"{status} after {len(err.partial)} bytes")
        except (ConnectionError, OSError) as err:
            raise Lost("truncated body", f"{status}: {type(err).__name__}")
        return Response(status, headers, body, raw)

    # ----- request kinds ------------------------------------------------------------------
    # Each takes the worker's slot, whose `conn` is its kept-alive connection (or None).

    async def exchange(self, slot, request, method):
        """One request and its response on the slot's kept-alive connection (opened if needed)."""
        conn = slot.conn
        if conn is not None and not conn.usable():
            if conn.reader.at_eof():
                self.keepalive_reconnects += 1
            conn.abort()
            conn = None
        slot.conn = None  # set again only once the exchange has worked
        if conn is None:
            conn = await self.connect()
        conn.uses += 1
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            response = await self.read_response(conn.reader, method)
        except BaseException:
            conn.abort()
            raise
        conn.last_used = time.monotonic()
        if response.wants_close():
            conn.abort()
            conn = None
        slot.conn = conn
        return response

    @staticmethod
    def expect_json(response, status, key):
        if response.status != status:
            raise Lost(f"status {response.status}", repr(response.body[:160]))
        try:
            parsed = json.loads(response.body)
        except ValueError:
            raise Lost("body not JSON", response.describe())
        if not isinstance(parsed, dict) or key not in parsed:
            raise Lost(f"no {key!r} in body", response.describe())
        return parsed

    async def do_plain(self, slot, rng):
        response = await self.exchange(slot, self.req_plain, b"POST")
        parsed = self.expect_json(response, 200, "choices")
        if not parsed["choices"]:
            raise Lost("empty choices", response.describe())

    async def do_models(self, slot, rng):
        response = await self.exchange(slot, self.req_models, b"GET")
        self.expect_json(response, 200, "data")

    async def do_no_token(self, slot, rng):
        if rng.random() < 0.5:
            body = b'{"model":"gpt-mock","messages":[]}'
            extra = b"Content-Type: application/json\r\n"
            if rng.random() < 0.5:
                extra += b"Authorization: Bearer not-the-token\r\n"
            request = self.request(b"POST", b"/v1/chat/completions", extra, body, auth=False)
            method = b"POST"
        else:
            request = self.request(b"GET", b"/v1/models", b"", None, auth=False)
            method = b"GET"
        response = await self.exchange(slot, request, method)
        parsed = self.expect_json(response, 401, "error")
        if parsed.get("error") != "unauthorized":
            raise Lost("wrong error code", response.describe())

    async def do_stream(self, slot, rng):
        response = await self.exchange(slot, self.req_stream, b"POST")
        if response.status != 200:
            raise Lost(f"status {response.status}", repr(response.body[:160]))
        body = response.body
        if not body.endswith(b"data: [DONE]\n\n"):
            raise Lost("stream without [DONE]", repr(body[-160:]))
        events = body.count(b"\n\n")
        if events != self.stream_events:
            raise Lost("wrong event count", f"{events} events, expected {self.stream_events}")
        if b'"error"' in body:
            raise Lost("error event in stream", repr(body[-200:]))

    async def do_cancelled(self, slot, rng):
        # Its own connection: the point is to drop it mid-stream.
        fresh = await self.connect()
        reset = rng.random() < 0.5
        try:
            fresh.writer.write(self.req_cancel)
            await fresh.writer.drain()
            status, headers, _ = await self.read_head(fresh.reader)
            if status != 200:
                raise Lost(f"status {status}")
            if "chunked" not in headers.get("transfer-encoding", "").lower():
                raise Lost("stream not chunked", str(headers)[:160])
            want = 1 + rng.randrange(3)  # the first event, sometimes a couple more
            seen = b""
            try:
                while seen.count(b"\n\n") < want:
                    chunk = await self.read_chunk(fresh.reader)
                    if not chunk:
                        raise Lost("stream ended early", repr(seen[-160:]))
                    seen += chunk
            except asyncio.IncompleteReadError:
                raise Lost("truncated before first event", repr(seen[-160:]))
            if not seen.startswith(b"data: "):
                raise Lost("not an SSE event", repr(seen[:160]))
        finally:
            fresh.abort(reset=reset)

    async def oversized_exchange(self, head, body_parts):
        """Sends `head`, then as much of the body as the proxy takes, and reads the answer.

        The proxy answers 413 and closes while the body may still be on its way, so writes can
        fail with EPIPE or ECONNRESET; the answer is in the socket's receive queue all the same,
        and a client that reads after a failed write gets it. asyncio streams cannot do that (a
        failed write poisons their reader), so this exchange uses the loop's plain socket calls.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (ONLY_HOST, self.port))  # 127.0.0.1 only
            self.connections += 1
            write_error = None
            try:
                await loop.sock_sendall(sock, head)
                for part in body_parts:
                    await loop.sock_sendall(sock, part)
            except (ConnectionError, OSError) as err:
                write_error = type(err).__name__
            received = bytearray()
            read_error = None
            try:
                while not response_complete(received):
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        break
                    received += data
            except (ConnectionError, OSError) as err:
                read_error = type(err).__name__
        finally:
            sock.close()
        reader = asyncio.StreamReader()
        reader.feed_data(bytes(received))
        reader.feed_eof()
        try:
            response = await self.read_response(reader)
        except Lost as lost:
            notes = [f"{name} failed: {error}" for name, error in
                     (("write", write_error), ("read", read_error)) if error]
            if notes:
                lost.detail = (lost.detail + " (" + "; ".join(notes) + ")").strip()
            raise
        parsed = self.expect_json(response, 413, "error")
        if parsed.get("error") != "payload_too_large":
            raise Lost("wrong error code", response.describe())

    async def do_over_decl(self, slot, rng):
        declared = self.max_body + 1 + rng.randrange(4 * self.max_body)
        variant = rng.randrange(3)
        extra = b"Content-Type: application/json\r\n"
        if variant == 0:
            # Like curl with a large body: headers only until the server says 100 Continue.
            extra += b"Expect: 100-continue\r\n"
            parts = []
        elif variant == 1:
            parts = []  # headers only, then waits
        else:
            parts = [b'{"model":"gpt-mock","messages":[{"role":"user","content":"' + b"x" * 16000]
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + self.host_header
            + self.auth
            + extra
            + b"Content-Length: %d\r\n\r\n" % declared
        )
        await self.oversized_exchange(head, parts)

    async def do_over_chunk(self, slot, rng):
        total = self.max_body + 1 + rng.randrange(1, 32768)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + self.host_header
            + self.auth
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        parts = []
        left = total
        while left > 0:
            size = min(left, 8192)
            parts.append(b"%x\r\n" % size + b"y" * size + b"\r\n")
            left -= size
        parts.append(b"0\r\n\r\n")
        await self.oversized_exchange(head, parts)

    MALFORMED = (
        b"POST /v1/chat/completions HTTP/1.1\r\n{host}{auth}"
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GARBAGE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n{host}{auth}This line has no colon\r\n\r\n",
    )

    async def do_malformed(self, slot, rng):
        template = self.MALFORMED[rng.randrange(len(self.MALFORMED))]
        request = template.replace(b"{host}", self.host_header).replace(b"{auth}", self.auth)
        fresh = await self.connect()
        try:
            fresh.writer.write(request)
            await fresh.writer.drain()
            response = await self.read_response(fresh.reader)
            if response.status != 400:
                raise Lost(f"status {response.status}", repr(response.body[:160]))
            # The proxy must close a connection it cannot parse.
            rest = await fresh.reader.read(1024)
            if rest:
                raise Lost("data after 400", repr(rest[:160]))
        finally:
            fresh.abort()

    # ----- the run ------------------------------------------------------------------------

    def record_loss(self, kind, reason, detail, started):
        self.lost[kind] += 1
        self.reasons[kind][reason] += 1
        if len(self.samples[kind]) < MAX_SAMPLES:
            wall = self.wall0 + (started - self.t0)
            self.samples[kind].append(
                {
                    "at": time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z",
                    "reason": reason,
                    "detail": detail,
                    "after_s": round(time.monotonic() - started, 3),
                }
            )

    async def worker(self, index):
        rng = random.Random(self.args.seed * 1000 + index)
        handlers = {kind: getattr(self, f"do_{kind}") for kind in KINDS}
        weights = [MIX[kind] for kind in KINDS]
        slot = Slot()
        # Staggered start so that connections do not all open in the same millisecond.
        await asyncio.sleep(rng.random() * min(0.5, self.args.seconds / 10))
        while time.monotonic() < self.stop_at and self.started_total < self.args.max_requests:
            kind = rng.choices(KINDS, weights)[0]
            self.sent[kind] += 1
            self.started_total += 1
            started = time.monotonic()
            reason = None
            try:
                await asyncio.wait_for(handlers[kind](slot, rng), self.args.timeout)
            except Lost as lost:
                reason, detail = lost.reason, lost.detail
            except asyncio.TimeoutError:
                reason, detail = "timeout", f"no answer within {self.args.timeout}s"
            except asyncio.IncompleteReadError as err:
                reason, detail = "truncated", f"{len(err.partial)} bytes"
            except (ConnectionError, OSError) as err:
                reason, detail = type(err).__name__, str(err)
            except Exception as err:  # a parsing surprise: still a loss, with its name
                reason, detail = f"client {type(err).__name__}", str(err)[:160]
            if reason is None:
                self.ok[kind] += 1
                elapsed = time.monotonic() - started
                self.latency_sum[kind] += elapsed
                if elapsed > self.latency_max[kind]:
                    self.latency_max[kind] = elapsed
            else:
                self.record_loss(kind, reason, detail, started)
                # Whatever went wrong, the kept connection is in an unknown state.
                if slot.conn is not None:
                    slot.conn.abort()
                    slot.conn = None
        if slot.conn is not None:
            slot.conn.abort()

    async def progress(self):
        """A progress line every PROGRESS seconds; ends the run early if the proxy has exited."""
        every = self.args.progress
        next_line = self.t0 + every if every > 0 else float("inf")
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            if self.args.pid and not process_alive(self.args.pid):
                print(f"    [{self.args.label}] the proxy (pid {self.args.pid}) has exited: "
                      "stopping the load", flush=True)
                self.stop_at = now
                return
            if now < next_line:
                continue
            next_line += every
            elapsed = now - self.t0
            done = sum(self.ok.values()) + sum(self.lost.values())
            line = (
                f"    [{self.args.label}] {elapsed:5.0f}s  requests {done:>8}  "
                f"lost {sum(self.lost.values())}  {done / elapsed:7.0f} req/s"
            )
            if self.args.pid:
                line += "  proxy " + proc_brief(self.args.pid)
            print(line, flush=True)

    async def run(self):
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.stop_at = self.t0 + self.args.seconds
        cpu0 = time.process_time()
        ticker = asyncio.ensure_future(self.progress())
        workers = [asyncio.ensure_future(self.worker(i)) for i in range(self.args.workers)]
        # Hard bound: the run, then the longest a request may take, then a margin.
        hard = self.args.seconds + self.args.timeout + 10
        done, pending = await asyncio.wait(workers, timeout=hard)
        for task in pending:
            task.cancel()
        ticker.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        self.elapsed = time.monotonic() - self.t0
        self.cpu = time.process_time() - cpu0
        return not pending

    def summary(self):
        rows = {}
        for kind in KINDS:
            ok = self.ok[kind]
            rows[kind] = {
                "sent": self.sent[kind],
                "ok": ok,
                "lost": self.lost[kind],
                "mean_ms": round(1000 * self.latency_sum[kind] / ok, 1) if ok else None,
                "max_ms": round(1000 * self.latency_max[kind], 1),
                "reasons": dict(self.reasons[kind]),
                "samples": self.samples[kind],
            }
        total_sent = sum(self.sent.values())
        return {
            "label": self.args.label,
            "seconds": round(self.elapsed, 2),
            "workers": self.args.workers,
            "sent": total_sent,
            "ok": sum(self.ok.values()),
            "lost": sum(self.lost.values()),
            "unfinished": total_sent - sum(self.ok.values()) - sum(self.lost.values()),
            "rps": round(total_sent / self.elapsed, 1) if self.elapsed else 0.0,
            "connections": self.connections,
            "keepalive_reconnects": self.keepalive_reconnects,
            "loadgen_cpu_core": round(self.cpu / self.elapsed, 2) if self.elapsed else 0.0,
            "kinds": rows,
        }


def response_complete(received):
    """True once `received` holds a whole final response (Content-Length or chunked body)."""
    end = received.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(received[:end]).decode("latin-1").lower()
    body = end + 4
    if head.startswith("http/1.1 1"):
        return response_complete(received[body:])
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        pos = body
        while True:
            line_end = received.find(b"\r\n", pos)
            if line_end < 0:
                return False
            try:
                size = int(bytes(received[pos:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                return True  # not chunked after all: let the parser say what is wrong
            if size == 0:
                return received.find(b"\r\n\r\n", line_end) >= 0  # (trailers and) the end
            pos = line_end + 2 + size + 2
            if pos > len(received):
                return False
    if headers.get("content-length", "").isdigit():
        return len(received) - body >= int(headers["content-length"])
    return False  # delimited by the close: read to the end


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except OSError:
        return False


def proc_brief(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        rss, anon = (int(fields[name].split()[0]) for name in ("VmRSS", "RssAnon"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return f"rss {rss} kB (anon {anon}), fds {fds}"
    except (OSError, KeyError, ValueError):
        return "gone"


def print_table(summary, out=sys.stdout):
    p = lambda *a: print(*a, file=out)
    p(f"  {'kind':<11} {'sent':>8} {'ok':>8} {'lost':>6} {'mean ms':>8} {'max ms':>8}  reasons")
    for kind, row in summary["kinds"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in row["reasons"].items())
        mean = f"{row['mean_ms']:.1f}" if row["mean_ms"] is not None else "-"
        p(
            f"  {kind:<11} {row['sent']:>8} {row['ok']:>8} {row['lost']:>6} {mean:>8} "
            f"{row['max_ms']:>8.1f}  {reasons}"
        )
    p(
        f"  {'total':<11} {summary['sent']:>8} {summary['ok']:>8} {summary['lost']:>6}"
        f"   {summary['rps']:.0f} req/s over {summary['seconds']:.1f}s, "
        f"{summary['connections']} connections, load generator CPU "
        f"{summary['loadgen_cpu_core']:.2f} core"
    )
    if summary["unfinished"]:
        p(f"  UNFINISHED: {summary['unfinished']} requests still running at the hard deadline")
    if summary["keepalive_reconnects"]:
        p(
            f"  note: {summary['keepalive_reconnects']} kept-alive connections were found closed by "
            "the proxy before reuse (reconnected, not counted as lost)"
        )
    for kind, row in summary["kinds"].items():
        for sample in row["samples"][:PRINTED_SAMPLES]:
            p(
                f"  lost {kind} at {sample['at']} after {sample['after_s']}s: "
                f"{sample['reason']} {sample['detail']}"
            )
        if row["lost"] > PRINTED_SAMPLES:
            p(f"  ... {row['lost'] - PRINTED_SAMPLES} more {kind} lost (first {MAX_SAMPLES} in the JSON)")


async def fill_pool(args):
    """WORKERS plain requests at once, each held FILL_DELAY_MS at the upstream so they overlap.

    The proxy's upstream pool then holds exactly one idle connection per worker (no phase has
    more upstream requests in flight than that), so the fd readings that follow are not at the
    mercy of how many pooled connections the last seconds happened to leave. A pool that leaks
    still shows: it ends up above WORKERS.
    """
    generator = Generator(args)
    delayed = generator.req_plain.replace(
        b"\r\n\r\n", b"\r\nx-mock-delay-ms: %d\r\n\r\n" % args.fill_delay_ms, 1
    )

    async def one():
        slot = Slot()
        try:
            response = await generator.exchange(slot, delayed, b"POST")
            generator.expect_json(response, 200, "choices")
            return None
        except Lost as lost:
            return f"{lost.reason} {lost.detail}"
        except (asyncio.TimeoutError, ConnectionError, OSError) as err:
            return type(err).__name__
        finally:
            if slot.conn is not None:
                slot.conn.abort()

    results = await asyncio.wait_for(
        asyncio.gather(*(one() for _ in range(args.workers))), args.timeout
    )
    failed = [result for result in results if result is not None]
    for failure in failed[:MAX_SAMPLES]:
        print(f"  pool fill request lost: {failure}")
    return len(failed)


async def wait_ready(args):
    """One plain chat request, retried until it succeeds or `args.timeout` passes."""
    generator = Generator(args)
    deadline = time.monotonic() + args.timeout
    last = "never tried"
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(generator.do_plain(Slot(), random.Random(0)), 2)
            return True
        except (Lost, asyncio.TimeoutError, ConnectionError, OSError) as err:
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)} {getattr(err, 'detail', '')}"
        await asyncio.sleep(0.2)
    print(f"proxy not ready: {last}", file=sys.stderr)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=ONLY_HOST, help="must be 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--max-body", type=int, required=True, help="the proxy's MAX_BODY_BYTES")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=10, help="per request, seconds")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="cap on requests started")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label", default="soak")
    parser.add_argument("--pid", type=int, default=0, help="proxy PID, for progress lines")
    parser.add_argument("--progress", type=float, default=10, help="seconds between progress lines")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--ready", action="store_true", help="only wait until a chat request works")
    parser.add_argument(
        "--fill", action="store_true", help="only send WORKERS overlapping plain requests"
    )
    parser.add_argument("--fill-delay-ms", type=int, default=300)
    args = parser.parse_args()

    if args.host != ONLY_HOST:
        parser.error(f"refusing to target {args.host!r}: the soak only ever talks to {ONLY_HOST}")
    if not 0 < args.port < 65536:
        parser.error("--port out of range")
    if args.workers < 1 or args.workers > 1024 or args.seconds <= 0 or args.timeout <= 0:
        parser.error("--workers must be 1..1024, --seconds and --timeout positive")

    # One connection per worker plus one fresh connection at most: far below any fd limit, but
    # raise the soft limit to the hard one anyway.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.ready:
        sys.exit(0 if asyncio.run(wait_ready(args)) else 1)
    if args.fill:
        try:
            lost = asyncio.run(fill_pool(args))
        except asyncio.TimeoutError:
            print(f"  pool fill: no answers within {args.timeout}s")
            lost = args.workers
        sys.exit(0 if lost == 0 else 1)

    generator = Generator(args)
    finished = asyncio.run(generator.run())
    summary = generator.summary()
    print_table(summary)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)
    sys.exit(0 if finished and summary["lost"] == 0 and summary["unfinished"] == 0 else 1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
