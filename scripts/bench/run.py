#!/usr/bin/env python3
"""Benchmark driver behind scripts/bench.sh: direct vs nginx vs llm-proxy, on loopback.

Targets (every llm-proxy instance is the same release binary with AUTH_VALIDATION=true,
WORKER_THREADS=BENCH_WORKERS and MAX_CONCURRENT_REQUESTS raised above the largest stream count;
each differs from "proxy" in one thing, so a row next to "proxy" in the same run is what that one
thing costs):
  direct     -- load straight at the mock upstream (--no-record): the floor;
  nginx      -- nginx as the equivalent proxy (scripts/bench/nginx.conf.template);
  proxy      -- the token in ALLOWED_TOKENS, LOG_LEVEL=info (one access line per request, to a file);
  proxy-h2   -- "proxy" in front of a second mock in its TLS mode (--tls-self-signed; trusted with
                UPSTREAM_CA_FILE), which offers h2 by ALPN, as real providers do: every stream rides
                one HTTP/2 connection. Its upstream differs from direct's, so no added latency is
                computed for it, and its CPU includes the TLS that nginx's plain upstream does not;
  quiet      -- "proxy" with LOG_LEVEL=error: no access line (proxy vs quiet = the access line);
  limited    -- the token as a clients-file client (CLIENTS_FILE) with every limit set, none
                reached, and a model list: the body read for the model, the charge before the call
                and the settlement from `usage` after it;
  shared     -- "limited" with REDIS_URL: its limits in a redis-server started for the run (one
                script call per decision and per settlement; the redis-server's CPU is counted
                with the proxy's, since a deployment pays for both; the script calls per request
                are counted from the server's INFO);
  clients1   -- the token as a clients-file client without limits, alone in the file;
  clients10k -- the same client among BENCH_CLIENTS - 1 others with random tokens: cost flat in
                the number of clients means clients10k = clients1.

Started by scripts/bench.sh once nginx, wrk and the release binaries are in place; it can be run
on its own with the same environment. Python 3 standard library only.

Phases, each target measured back to back in the same run:
  1. footprint: stripped binary size; start-up time (spawn -> first accepted TCP connection, and
     -> first HTTP response, a 401 that needs no upstream) and idle RSS/PSS of fresh instances;
  2. plain chat completions with wrk at each BENCH_PLAIN_CONCURRENCY (1 and 32), for
     BENCH_PLAIN_TARGETS (default: all but proxy-h2): req/s, latency p50/p99, added latency
     versus direct, CPU time per request of the target;
  3. SSE streams with `loadgen sse` (tools/loadgen) at each BENCH_STREAM_CONCURRENCY (200 and 1000),
     20 chunks 50 ms apart, for BENCH_STREAM_TARGETS (default direct, nginx, proxy, proxy-h2): time
     to first chunk, gaps between chunks, CPU time per forwarded chunk, peak RSS, errors;
  4. many streams: the same at each BENCH_MANY_STREAMS (5000), for BENCH_MANY_TARGETS (the same
     four), with chunks BENCH_MANY_INTERVAL_MS (250 ms) apart, so that 5000 streams make about
     as many events a second as 1000 streams 50 ms apart: CPU per chunk stays comparable and
     the peak RSS grows with the open streams alone. KB per open stream = (peak RSS at 5000 -
     peak RSS at 1000) / 4000, and (peak RSS at 5000 - idle RSS of a fresh instance) / 5000.
     Connections open over max(1 s, streams / 2500 s).
Then it summarises how the cost grows (200 -> 1000 -> 5000 streams: CPU per chunk and peak RSS;
1 -> 10,000 clients: CPU per request), checks the targets of issue 13 (ratios against nginx, and
each feature against the row it adds to, measured in the same run; figures the issue asks to be
reported are INFO lines), prints a table to stdout and writes everything to BENCH_OUT (default
target/bench/results.json).

A feature's CPU against the row it adds to (limited vs proxy, proxy vs quiet, clients10k vs
clients1) is the median over rounds of the ratio within a round, where the two ran back to back
(the rows compared stay neighbours while the order rotates, in either direction): on a shared
VM, CPU per request at c=32 drifts by 10% and more between rounds with nothing else running,
and that drift mostly cancels within a pair. The other figures are pooled over the rounds (CPU,
counts) or the median of the rounds (percentiles).

Time: with the defaults about 6 minutes of measurement on a 2-core machine: plain 8 targets x
2 concurrencies x (1 s warm-up + 4 rounds of 2 s), about 165 s; streams 4 targets x 2
concurrencies x 2 rounds of 6 s of new streams (+1 s for the last ones to end), about 120 s;
5000 streams 4 targets x 1 round (each about 12 s), about 50 s; footprint and start-ups, 10 s.
The limited and shared targets are measured in the plain phase only (their cost is per request),
and proxy-h2 in the stream phases only (memory and CPU per chunk through an HTTP/2 upstream);
BENCH_*_TARGETS put them back.

Exit status: 0 when the benchmark ran, whatever the targets say; 1 when it could not run
(a process did not start, a load generator failed, ...).

CPU pinning (BENCH_PIN, default "split") -- only 2 cores, so a compromise:
  * "split": the load generator alone on CPU 0; the system under test (the mock upstreams, the
    redis-server and the proxy being measured, nginx or llm-proxy) on CPU 1. The load generator
    then never competes with what it measures, and every target -- direct included -- gets the
    same single core to share with the upstream, so req/s at concurrency 32 is "one core's worth
    of upstream + proxy" and CPU-per-request is not muddied by idle cores spinning. Worker
    counts: each side keeps the deployment default of 2 (WORKER_THREADS=2 for llm-proxy, which
    would otherwise size its runtime from the 1-CPU affinity mask; `worker_processes 2` for
    nginx), so the multi-worker overhead (tokio's work stealing and parking, nginx's accept
    wake-ups) is still paid, but without cross-core wake-ups; the upstream is left at its own
    default (1 worker on 1 CPU). Caveats: two workers time-share one core, so a stall in one
    worker shows up as latency; on a real 2-core box the proxy would also pay inter-processor
    wake-ups (see "none"). At 1000 streams (~21k events/s, and about as many at 5000) the
    upstream and the proxy together need about a core, so CPU 1 is at or near saturation: time
    to first chunk and gaps there include queueing for that core (CPU per chunk and RSS do not).
    The load generator's own core should not be saturated (column gen); whatever its
    single-threaded runtime adds to the times is in the "direct" floor too.
  * "none": no pinning; everything floats over both cores (closest to an operator's box, noisier:
    the load generator and the upstream take CPU from the proxy, differently for each target).
BENCH_WORKERS overrides the worker count of both proxies (nginx worker_processes and
WORKER_THREADS); unset, it is 2.

The machine may be shared (other builds running): each run records the CPU time that processes
outside the benchmark used meanwhile ("background_cpu_util"); when it is high, the run is noisy,
the table says so (column bg), and a target whose rows had a round above 0.15 core is marked
PASS?/FAIL?/INFO?.
"""

import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

CLIENT_TOKEN = "bench-client-token-6f1d"
UPSTREAM_KEY = "sk-bench-upstream-0c9a"


def env_float(name, default):
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def env_int(name, default):
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def env_list(name, default):
    raw = os.environ.get(name, "").strip()
    if raw == "none":
        return []
    return [int(x) for x in raw.split(",") if x.strip()] if raw else default


def env_names(name, default):
    raw = os.environ.get(name, "").strip()
    if raw == "none":
        return []
    return [x.strip() for x in raw.split(",") if x.strip()] if raw else default


class BenchError(Exception):
    pass


def log(msg):
    sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


T0 = time.monotonic()

# ------------------------------------------------------------------------------------------------
# Settings

# Every target: what it is, in the docstring above.
ALL_TARGETS = ["direct", "nginx", "proxy", "proxy-h2", "quiet", "limited", "shared", "clients1", "clients10k"]
# The llm-proxy instances.
PROXIES = tuple(t for t in ALL_TARGETS if t not in ("direct", "nginx"))
# Behind the TLS HTTP/2 mock; every other target reaches (or is, for "direct") the plain one, so
# only those are compared with "direct".
H2_TARGETS = ("proxy-h2",)

SETTINGS = {
    "plain_seconds": env_float("BENCH_SECONDS", 2.0),
    "rounds": max(1, env_int("BENCH_ROUNDS", 4)),
    "warmup_seconds": env_float("BENCH_WARMUP_SECONDS", 1.0),
    "stream_seconds": env_float("BENCH_STREAM_SECONDS", 6.0),
    "stream_rounds": max(1, env_int("BENCH_STREAM_ROUNDS", 2)),
    "plain_concurrency": env_list("BENCH_PLAIN_CONCURRENCY", [1, 32]),
    "stream_concurrency": env_list("BENCH_STREAM_CONCURRENCY", [200, 1000]),
    "stream_chunks": env_int("BENCH_CHUNKS", 20),
    "stream_interval_ms": env_int("BENCH_INTERVAL_MS", 50),
    "many_streams": env_list("BENCH_MANY_STREAMS", [5000]),
    "many_interval_ms": env_int("BENCH_MANY_INTERVAL_MS", 250),
    "many_rounds": max(1, env_int("BENCH_MANY_ROUNDS", 1)),
    # Each feature row next to the row it is compared with (see plain_order).
    "plain_targets": env_names("BENCH_PLAIN_TARGETS", ["direct", "nginx", "quiet", "proxy", "limited", "shared",
                                                        "clients1", "clients10k"]),
    "stream_targets": env_names("BENCH_STREAM_TARGETS", ["direct", "nginx", "proxy", "proxy-h2"]),
    "many_targets": env_names("BENCH_MANY_TARGETS", ["direct", "nginx", "proxy", "proxy-h2"]),
    "clients": max(2, env_int("BENCH_CLIENTS", 10000)),
    "startup_tries": env_int("BENCH_STARTUP_TRIES", 10),
    "pin": os.environ.get("BENCH_PIN", "split").strip() or "split",
    "workers": env_int("BENCH_WORKERS", 2),
    "proxy_log": os.environ.get("BENCH_PROXY_LOG", "file").strip() or "file",
    "access_log": os.environ.get("BENCH_ACCESS_LOG", "file").strip() or "file",
    "out": os.environ.get("BENCH_OUT", "") or os.path.join(ROOT, "target", "bench", "results.json"),
    "nice": env_int("BENCH_NICE", -10),
    "keep_workdir": os.environ.get("BENCH_KEEP_WORKDIR", "") not in ("", "0", "false"),
}
# Where cargo put the release build (bench.sh also passes the paths explicitly).
RELEASE_DIR = os.path.join(os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target"), "release")
PROXY_BIN = os.environ.get("BENCH_PROXY_BIN") or os.path.join(RELEASE_DIR, "llm-proxy")
MOCK_BIN = os.environ.get("BENCH_MOCK_BIN") or os.path.join(RELEASE_DIR, "mock-upstream")
LOADGEN_BIN = os.environ.get("BENCH_LOADGEN_BIN") or os.path.join(RELEASE_DIR, "loadgen")
NGINX_BIN = os.environ.get("BENCH_NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx"
WRK_BIN = os.environ.get("BENCH_WRK_BIN") or shutil.which("wrk") or "wrk"

REDIS_BIN = os.environ.get("BENCH_REDIS_BIN") or shutil.which("redis-server") or "/usr/bin/redis-server"
# The "limited" client: every limit set, none reached by the load (2 x 1000 streams at most, tens
# of thousands of requests a minute), and a list holding the benchmark's model (gpt-4o-mini).
LIMITED_CLIENTS = """[clients.bench]
token = "%s"
requests_per_minute = 100000000
tokens_per_minute = 1000000000000
max_concurrent_requests = 100000
tokens_per_day = 1000000000000000
models = ["gpt-4o-*"]
"""
# "clients1" and "clients10k": the token as a client without limits, alone or among others.
PLAIN_CLIENT = """[clients.bench]
token = "%s"
"""

# ------------------------------------------------------------------------------------------------
# Pinning


def cpu_plan():
    allowed = sorted(os.sched_getaffinity(0))
    pin = SETTINGS["pin"]
    if pin == "split" and len(allowed) >= 2 and shutil.which("taskset"):
        return {"mode": "split", "loadgen": [allowed[0]], "sut": [allowed[1]]}
    if pin not in ("split", "none"):
        raise BenchError("BENCH_PIN must be split or none, not %r" % pin)
    return {"mode": "none", "loadgen": None, "sut": None}


def pinned(cmd, cpus):
    if not cpus:
        return cmd
    return ["taskset", "-c", ",".join(str(c) for c in cpus)] + cmd


# ------------------------------------------------------------------------------------------------
# /proc helpers


def proc_cpu_ticks(pid):
    """utime + stime of a process (all its threads, dead ones included), in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14, stime 15.
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pids):
    return sum(proc_cpu_ticks(p) for p in pids) / CLK_TCK


def status_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kb(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm(pids):
    for p in pids:
        try:
            with open("/proc/%d/clear_refs" % p, "w") as f:
                f.write("5")
        except OSError:
            return False
    return True


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(entry))
    return sorted(kids)


def thread_names(pid):
    names = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def system_times():
    """Machine-wide CPU seconds: process time (user+nice+system), softirq+irq, steal."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    return {
        "process": (vals[0] + vals[1] + vals[2]) / CLK_TCK,
        "irq": (vals[5] + vals[6]) / CLK_TCK,
        "steal": vals[7] / CLK_TCK,
    }


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def elf_is_stripped(path):
    """True when the ELF file has no .symtab section."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    endian = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
    for i in range(shnum):
        sh_type = struct.unpack_from(endian + "I", data, shoff + i * shentsize + 4)[0]
        if sh_type == 2:  # SHT_SYMTAB
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A server process of ours; `pids()` lists the processes whose CPU and memory count."""

    def __init__(self, name, popen, port, log_path=None):
        self.name = name
        self.popen = popen
        self.port = port
        self.log_path = log_path
        # Processes whose cost is this one's too (the "shared" proxy's redis-server).
        self.helpers = []
        # A mock upstream's base URL and, in TLS mode, the certificate to trust.
        self.url = None
        self.ca_file = None

    @property
    def pid(self):
        return self.popen.pid

    def pids(self):
        if self.name == "nginx":
            return [self.pid] + children_of(self.pid)
        return [self.pid] + [helper.pid for helper in self.helpers]

    def alive(self):
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(sig)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def start_mock(workdir, cpus, tls=False):
    """The mock upstream; with `tls`, its HTTPS mode (ALPN h2 and http/1.1), whose self-signed
    certificate lands in WORKDIR/mock-tls/cert.pem (`Proc.ca_file`)."""
    name = "mock-tls" if tls else "mock"
    out_path = os.path.join(workdir, "%s.out" % name)
    out = open(out_path, "w")
    cmd = [MOCK_BIN, "--host", "127.0.0.1", "--port", "0", "--no-record"]
    tls_dir = os.path.join(workdir, name)
    if tls:
        cmd += ["--tls-self-signed", tls_dir]
    popen = subprocess.Popen(
        pinned(cmd, cpus),
        stdout=out,
        stderr=open(os.path.join(workdir, "%s.err" % name), "w"),
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(out_path) as f:
            m = re.search(r"listening on (https?)://[^\s:]+:(\d+)", f.read())
        if m:
            proc = Proc(name, popen, int(m.group(2)))
            proc.url = "%s://127.0.0.1:%d" % (m.group(1), proc.port)
            proc.ca_file = os.path.join(tls_dir, "cert.pem") if tls else None
            return proc
        if popen.poll() is not None:
            break
        time.sleep(0.01)
    popen.kill()
    raise BenchError("mock-upstream (%s) did not start (see %s)" % (name, out_path))


def start_redis(workdir, cpus):
    """A redis-server for the "shared" proxy: loopback, no persistence, on the SUT's CPUs."""
    port = free_port()
    log_path = os.path.join(workdir, "redis.log")
    popen = subprocess.Popen(
        pinned([REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", workdir], cpus),
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    if not wait_listening(port, popen):
        popen.kill()
        raise BenchError("redis-server did not start (see %s)" % log_path)
    return Proc("redis", popen, port, None)


def max_concurrent_requests():
    """Every llm-proxy's MAX_CONCURRENT_REQUESTS: room for the largest stream run (the default,
    1024, would refuse most of 5000 streams)."""
    return max([1024] + [c + 1000 for c in SETTINGS["stream_concurrency"] + SETTINGS["many_streams"]])


def proxy_env(upstream_url, port, workers, clients_file=None, state_dir=None, redis_port=None,
              log_level="info", ca_file=None):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TARGET_HOST": upstream_url,
        "AUTH_BEARER": UPSTREAM_KEY,
        "PROXY_PORT": str(port),
        "LOG_LEVEL": log_level,
        "AUTH_VALIDATION": "true",
        "ALLOWED_TOKENS": CLIENT_TOKEN,
        "MAX_CONCURRENT_REQUESTS": str(max_concurrent_requests()),
    }
    if ca_file:
        env["UPSTREAM_CA_FILE"] = ca_file
    if clients_file:
        # The token moves from ALLOWED_TOKENS into the clients file (one token, one client).
        del env["ALLOWED_TOKENS"]
        env["CLIENTS_FILE"] = clients_file
        env["STATE_DIR"] = state_dir
    if redis_port:
        env["REDIS_URL"] = "redis://127.0.0.1:%d/0" % redis_port
    if workers:
        env["WORKER_THREADS"] = str(workers)
    # For experiments only (e.g. MALLOC_ARENA_MAX=2, LD_PRELOAD=...): space-separated NAME=VALUE.
    for item in os.environ.get("BENCH_PROXY_ENV", "").split():
        name, _, value = item.partition("=")
        if name:
            env[name] = value
    return env


def proxy_log_target(path):
    if SETTINGS["proxy_log"] == "discard":
        return subprocess.DEVNULL
    return open(path, "ab")


def clients_file_text(name):
    """The clients file of a proxy target, or None for those with ALLOWED_TOKENS."""
    if name in ("limited", "shared"):
        return LIMITED_CLIENTS % CLIENT_TOKEN
    if name == "clients1":
        return PLAIN_CLIENT % CLIENT_TOKEN
    if name == "clients10k":
        # The benchmark's client among BENCH_CLIENTS - 1 others with random tokens, in the middle
        # of the file (neither first nor last).
        others = SETTINGS["clients"] - 1
        lines = []
        for i in range(others):
            if i == others // 2:
                lines.append(PLAIN_CLIENT % CLIENT_TOKEN)
            lines.append('[clients.c%05d]\ntoken = "bench-%s"\n' % (i, os.urandom(9).hex()))
        return "\n".join(lines)
    return None


def start_proxy(workdir, upstream, cpus, workers, name="proxy", redis=None):
    # A port chosen here rather than PROXY_PORT=0 and the "listening on" line: works whatever the
    # log level and with the log discarded (the race for the port is harmless on loopback).
    port = free_port()
    log_path = os.path.join(workdir, "%s.log" % name)
    clients_file = state_dir = None
    text = clients_file_text(name)
    if text is not None:
        # A directory of its own, as a ConfigMap mount or /etc/llm-proxy is: the proxy watches
        # the file's directory, and with the run's logs in the same one every access line of
        # every target would wake each clients-file proxy's watcher (and charge the writer for
        # those wake-ups).
        clients_dir = os.path.join(workdir, "clients-%s" % name)
        os.makedirs(clients_dir, exist_ok=True)
        clients_file = os.path.join(clients_dir, "clients.toml")
        with open(clients_file, "w") as f:
            f.write(text)
        state_dir = os.path.join(workdir, "%s-state" % name)
    popen = subprocess.Popen(
        pinned([PROXY_BIN], cpus),
        env=proxy_env(upstream.url, port, workers, clients_file, state_dir,
                      redis.port if redis else None,
                      log_level="error" if name == "quiet" else "info",
                      ca_file=upstream.ca_file),
        cwd=os.path.join(workdir, "proxy-cwd"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=proxy_log_target(log_path),
    )
    if not wait_listening(port, popen):
        popen.kill()
        raise BenchError("llm-proxy (%s) did not start (see %s)" % (name, log_path))
    proc = Proc(name, popen, port, log_path if SETTINGS["proxy_log"] != "discard" else None)
    if redis:
        proc.helpers.append(redis)
    return proc


def nginx_conf(workdir, name, port, upstream_port, workers):
    with open(os.path.join(HERE, "nginx.conf.template")) as f:
        text = f.read()
    access = os.path.join(workdir, "nginx-%s-access.log" % name)
    if SETTINGS["access_log"] == "off":
        access = "off"
    subst = {
        "USER_LINE": "user root;" if os.geteuid() == 0 else "",
        "WORKERS": str(workers),
        "DIR": workdir,
        "ACCESS_LOG": access,
        "CLIENT_TOKEN": CLIENT_TOKEN,
        "UPSTREAM_KEY": UPSTREAM_KEY,
        "UPSTREAM_PORT": str(upstream_port),
        "PORT": str(port),
    }
    for key, value in subst.items():
        text = text.replace("@@%s@@" % key, value)
    if "@@" in text:
        raise BenchError("nginx template has an unknown placeholder")
    path = os.path.join(workdir, "nginx-%s.conf" % name)
    with open(path, "w") as f:
        f.write(text)
    return path, access


def spawn_nginx(workdir, name, port, upstream_port, cpus, workers):
    conf, access = nginx_conf(workdir, name, port, upstream_port, workers)
    popen = subprocess.Popen(
        pinned([NGINX_BIN, "-p", workdir, "-c", conf, "-e", os.path.join(workdir, "error.log")], cpus),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(workdir, "nginx.stderr"), "ab"),
        cwd=workdir,
    )
    return popen, access


def wait_listening(port, popen, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            if popen.poll() is not None:
                return False
            time.sleep(0.005)
    return False


def start_nginx(workdir, upstream_port, cpus, workers):
    port = free_port()
    popen, access = spawn_nginx(workdir, "bench", port, upstream_port, cpus, workers)
    if not wait_listening(port, popen):
        popen.kill()
        raise BenchError("nginx did not start (see %s/error.log)" % workdir)
    proc = Proc("nginx", popen, port, access)
    deadline = time.monotonic() + 5
    while len(proc.pids()) < 1 + workers and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def http_probe(port, timeout=5.0):
    """One request on a fresh connection; returns the status code (our proxies answer 401)."""
    s = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = s.recv(4096)
    finally:
        s.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# Start-up and idle footprint


def measure_startup(kind, workdir, upstream, cpus, workers, tries):
    """Spawn -> first accepted connection (connect() succeeds) and -> first HTTP response."""
    results = []
    for i in range(tries):
        port = free_port()
        if kind == "proxy":
            t0 = time.perf_counter()
            popen = subprocess.Popen(
                pinned([PROXY_BIN], cpus),
                env=proxy_env(upstream.url, port, workers),
                cwd=os.path.join(workdir, "proxy-cwd"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=proxy_log_target(os.path.join(workdir, "proxy-startup.log")),
            )
        else:
            conf_popen = spawn_nginx  # same command as the benchmarked instance
            t0 = time.perf_counter()
            popen, _ = conf_popen(workdir, "startup", port, upstream.port, cpus, workers)
        connected = None
        status = None
        deadline = t0 + 5.0
        while time.perf_counter() < deadline:
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                if popen.poll() is not None:
                    break
                time.sleep(0.0002)
                continue
            connected = time.perf_counter() - t0
            try:
                s.settimeout(5)
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = s.recv(4096)
                m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
                status = int(m.group(1)) if m else None
            finally:
                s.close()
            break
        responded = time.perf_counter() - t0 if status else None
        time.sleep(0.3)  # let it settle: idle footprint of a fresh instance
        pids = [popen.pid] + (children_of(popen.pid) if kind == "nginx" else [])
        try:
            rss = sum(status_kb(p, "VmRSS") for p in pids)
            pss = sum(pss_kb(p) or 0 for p in pids)
            threads = sum(status_kb(p, "Threads") for p in pids)
        except OSError:
            rss = pss = threads = None
        proc = Proc(kind, popen, port)
        proc.stop(signal.SIGTERM if kind == "proxy" else signal.SIGQUIT)
        if connected is None or status is None:
            raise BenchError("%s did not answer during the start-up measurement" % kind)
        results.append(
            {
                "connect_ms": connected * 1000,
                "first_response_ms": responded * 1000,
                "status": status,
                "idle_rss_kb": rss,
                "idle_pss_kb": pss,
                "processes": len(pids),
                "threads": threads,
            }
        )
    med = lambda key: statistics.median(r[key] for r in results)
    return {
        "tries": tries,
        "connect_ms_median": round(med("connect_ms"), 3),
        "first_response_ms_median": round(med("first_response_ms"), 3),
        "first_response_ms_max": round(max(r["first_response_ms"] for r in results), 3),
        "idle_rss_kb_median": med("idle_rss_kb"),
        "idle_pss_kb_median": med("idle_pss_kb"),
        "runs": results,
    }


# ------------------------------------------------------------------------------------------------
# Load runs


class Window:
    """CPU of the measured processes, of the load generator (waited-for children) and of
    everything else on the machine, over one load run."""

    def __init__(self, target_pids, upstream_pids):
        self.target_pids = target_pids
        self.upstream_pids = upstream_pids

    def __enter__(self):
        self.t0 = time.monotonic()
        self.target0 = cpu_seconds(self.target_pids)
        self.up0 = cpu_seconds(self.upstream_pids)
        self.sys0 = system_times()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.gen0 = ru.ru_utime + ru.ru_stime
        self.self0 = sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        self.target = cpu_seconds(self.target_pids) - self.target0
        self.upstream = cpu_seconds(self.upstream_pids) - self.up0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.loadgen = ru.ru_utime + ru.ru_stime - self.gen0
        driver = sum(os.times()[:2]) - self.self0
        sys1 = system_times()
        busy = sys1["process"] - self.sys0["process"]
        # Processes outside the benchmark. Loopback TCP work done in softirq context is charged
        # to no process (not to the proxies' utime+stime either): it is reported apart.
        self.background = max(0.0, busy - self.target - self.upstream - self.loadgen - driver)
        self.irq = sys1["irq"] - self.sys0["irq"]
        self.steal = sys1["steal"] - self.sys0["steal"]
        return False

    def as_dict(self, target_included):
        return {
            "wall_s": round(self.wall, 3),
            "target_cpu_s": round(self.target, 3) if target_included else None,
            "upstream_cpu_s": round(self.upstream, 3),
            "loadgen_cpu_s": round(self.loadgen, 3),
            "background_cpu_util": round(self.background / self.wall, 3) if self.wall else None,
            "softirq_cpu_util": round(self.irq / self.wall, 3) if self.wall else None,
            "steal_cpu_util": round(self.steal / self.wall, 3) if self.wall else None,
        }


def run_wrk(port, concurrency, seconds, cpus):
    cmd = pinned(
        [
            WRK_BIN,
            "-t1",
            "-c%d" % concurrency,
            "-d%ds" % max(1, int(round(seconds))),
            "--timeout",
            "5s",
            "-s",
            os.path.join(HERE, "plain.lua"),
            "http://127.0.0.1:%d/v1/chat/completions" % port,
        ],
        cpus,
    )
    env = dict(os.environ, BENCH_CLIENT_TOKEN=CLIENT_TOKEN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError("wrk failed (%d): %s" % (proc.returncode, proc.stderr.strip()))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise BenchError("wrk printed no summary: %s" % proc.stdout[-500:])
    return json.loads(lines[-1])


def ramp_seconds(concurrency):
    """Seconds over which the load generator opens its connections: one, or more above 2500
    streams so that the accept queue never overflows (a dropped SYN costs a 1 s retransmit)."""
    return max(1.0, concurrency / 2500.0)


def run_sse(port, concurrency, seconds, interval_ms, cpus, rss_pids):
    cmd = pinned(
        [
            LOADGEN_BIN,
            "sse",
            "--port",
            str(port),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(seconds),
            "--ramp",
            "%g" % ramp_seconds(concurrency),
            "--chunks",
            str(SETTINGS["stream_chunks"]),
            "--interval-ms",
            str(interval_ms),
        ]
        + [x for p in rss_pids for x in ("--pid", str(p))],
        cpus,
    )
    env = dict(os.environ, BENCH_CLIENT_TOKEN=CLIENT_TOKEN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise BenchError("loadgen sse failed (%d): %s" % (proc.returncode, proc.stderr.strip()[-2000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def redis_commands(port):
    """(script calls, commands) the redis-server has run so far: EVAL/EVALSHA calls, which are
    what llm-proxy sends (one per decision or settlement, so one per round trip), and every
    command, those the scripts run inside included (INFO's total_commands_processed)."""
    s = socket.create_connection(("127.0.0.1", port), 5)
    try:
        s.sendall(b"INFO everything\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                break
    finally:
        s.close()
    m = re.search(rb"total_commands_processed:(\d+)", data)
    if not m:
        raise BenchError("redis-server INFO has no total_commands_processed")
    scripts = sum(int(n) for n in re.findall(rb"cmdstat_(?:eval|evalsha|eval_ro|evalsha_ro|fcall|fcall_ro):calls=(\d+)", data))
    return scripts, int(m.group(1))


def access_statuses(path, kind, offset):
    """Counts of HTTP statuses in an access log from byte `offset`; returns (counts, new offset)."""
    counts = {}
    if not path or path == "off" or not os.path.exists(path):
        return None, offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
        end = f.tell()
    if kind in PROXIES:
        found = re.findall(rb" status=(\d{3}) ", data)
    else:
        found = re.findall(rb'" (\d{3}) ', data)
    for s in found:
        key = s.decode()
        counts[key] = counts.get(key, 0) + 1
    return counts, end


# ------------------------------------------------------------------------------------------------
# Main


def boost_priority():
    """Own session, hence own autogroup, at a higher weight than the rest of the machine.

    On a shared machine (other sessions building) an equal share of the CPU makes every figure
    noisy. The kernel groups tasks by session ("autogroup") and shares CPU between groups, so a
    plain `nice` would only reorder our own processes; the weight of our own group is what counts.
    Everything started from here inherits it, load generators and servers alike, so no target is
    favoured over another. BENCH_NICE=0 leaves priorities alone.
    """
    nice = SETTINGS["nice"]
    if nice == 0:
        return "unchanged"
    try:
        os.setsid()
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
        return "autogroup nice %d" % nice
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return "nice %d" % nice
    except OSError as err:
        return "unchanged (%s)" % err


def wanted_targets():
    """Every target some phase measures, in ALL_TARGETS order; unknown names are an error."""
    named = SETTINGS["plain_targets"] + SETTINGS["stream_targets"] + SETTINGS["many_targets"]
    unknown = sorted(set(named) - set(ALL_TARGETS))
    if unknown:
        raise BenchError("unknown target(s) %s in BENCH_*_TARGETS (known: %s)" % (", ".join(unknown), ", ".join(ALL_TARGETS)))
    return [t for t in ALL_TARGETS if t in named]


def main():
    priority = boost_priority()
    plan = cpu_plan()
    workers = SETTINGS["workers"]
    for path, what in ((PROXY_BIN, "llm-proxy"), (MOCK_BIN, "mock-upstream"), (LOADGEN_BIN, "loadgen"), (NGINX_BIN, "nginx")):
        if not os.access(path, os.X_OK):
            raise BenchError("%s not found at %s" % (what, path))
    wanted = wanted_targets()
    # The proxy holds two descriptors per stream over HTTP/1 (caller and upstream), every other
    # process one; the children inherit this limit (nginx sets its own, worker_rlimit_nofile).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(SETTINGS["stream_concurrency"] + SETTINGS["many_streams"] + [64]) + 512
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard > 0 else need, hard))
        except (ValueError, OSError):
            pass
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < need:
        raise BenchError("open-file limit %d is below the %d this run needs (ulimit -n)" % (nofile, need))

    workdir = tempfile.mkdtemp(prefix="llm-proxy-bench.")
    os.makedirs(os.path.join(workdir, "proxy-cwd"))
    log("work dir %s, pinning %s, workers %d, targets %s" % (workdir, plan["mode"], workers, ", ".join(wanted)))
    results = {
        "meta": {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "pinning": plan,
            "priority": priority,
            "workers": workers,
            "settings": SETTINGS,
            "proxy_env": {k: v for k, v in proxy_env("", 0, workers).items() if k not in ("PATH", "HOME", "AUTH_BEARER", "ALLOWED_TOKENS", "TARGET_HOST", "PROXY_PORT")},
            "proxy_extra_env": os.environ.get("BENCH_PROXY_ENV", ""),
            "proxy_log": "stderr -> file in the work dir" if SETTINGS["proxy_log"] == "file" else "stderr -> /dev/null",
            "nginx_access_log": "file in the work dir (default combined format, unbuffered)" if SETTINGS["access_log"] == "file" else "off",
            "versions": versions(),
        },
        "footprint": {},
        "plain": [],
        "stream": [],
    }
    procs = []
    try:
        mock = start_mock(workdir, plan["sut"])
        procs.append(mock)
        log("mock upstream on port %d" % mock.port)
        mock_tls = None
        if any(t in H2_TARGETS for t in wanted):
            mock_tls = start_mock(workdir, plan["sut"], tls=True)
            procs.append(mock_tls)
            log("TLS mock upstream (h2) on port %d" % mock_tls.port)

        # -- footprint ---------------------------------------------------------------------------
        size = os.path.getsize(PROXY_BIN)
        results["footprint"]["proxy_binary"] = {
            "path": os.path.relpath(PROXY_BIN, ROOT),
            "bytes": size,
            "stripped": elf_is_stripped(PROXY_BIN),
        }
        results["footprint"]["nginx_binary"] = {"path": NGINX_BIN, "bytes": os.path.getsize(NGINX_BIN)}
        for kind in ("proxy", "nginx"):
            log("start-up x%d: %s" % (SETTINGS["startup_tries"], kind))
            results["footprint"]["startup_" + kind] = measure_startup(
                kind, workdir, mock, plan["sut"], workers, SETTINGS["startup_tries"]
            )

        # -- the targets -------------------------------------------------------------------------
        owners = {"direct": None}
        upstreams = {t: (mock_tls if t in H2_TARGETS else mock) for t in wanted}
        redis = None
        for target in wanted:
            if target == "nginx":
                owners[target] = start_nginx(workdir, mock.port, plan["sut"], workers)
            elif target in PROXIES:
                if target == "shared":
                    redis = start_redis(workdir, plan["sut"])
                    procs.append(redis)
                owners[target] = start_proxy(workdir, upstreams[target], plan["sut"], workers, target,
                                             redis if target == "shared" else None)
            if owners[target]:
                procs.append(owners[target])
        time.sleep(0.3)
        for target in wanted:
            if owners[target]:
                status = http_probe(owners[target].port)
                if status != 401:
                    raise BenchError("%s answered %s to a request without a token, not 401" % (target, status))
        if "proxy" in owners:
            names = thread_names(owners["proxy"].pid)
            results["footprint"]["proxy_threads_at_start"] = {
                "total": len(names),
                "tokio_workers": sum(1 for n in names if n.startswith("tokio-runtime-w")),
            }
        if "nginx" in owners:
            results["footprint"]["nginx_worker_processes"] = len(owners["nginx"].pids()) - 1
        log("listening: %s" % ", ".join("%s %d" % (t, owners[t].port if owners[t] else mock.port) for t in wanted))
        ports = {t: (owners[t].port if owners[t] else mock.port) for t in wanted}
        ctx = {"ports": ports, "owners": owners, "upstreams": upstreams, "plan": plan,
               "offsets": {t: 0 for t in wanted}, "redis": redis}

        # -- plain -------------------------------------------------------------------------------
        # Rounds interleave the targets (rotating their order), so a burst of outside load or a
        # drift of the machine hits all of them alike; figures are pooled (counts, CPU) or the
        # median of the rounds (percentiles).
        targets = SETTINGS["plain_targets"]
        for conc in SETTINGS["plain_concurrency"] if targets else []:
            if SETTINGS["warmup_seconds"] > 0:
                for target in targets:
                    run_wrk(ports[target], conc, SETTINGS["warmup_seconds"], plan["loadgen"])
            rounds = {t: [] for t in targets}
            for rnd in range(SETTINGS["rounds"]):
                for target in plain_order(targets, rnd):
                    one = measure_plain(ctx, target, conc)
                    rounds[target].append(one)
                    log("plain c=%d %-10s round %d: %7.0f req/s p50 %5d us p99 %6d us cpu/req %s us errors %d non-2xx %d bg %.2f"
                        % (conc, target, rnd + 1, one["rps"], one["latency_us"]["p50"], one["latency_us"]["p99"],
                           one["cpu_us_per_request"], one["errors"], one["non_2xx"],
                           one["window"]["background_cpu_util"] or 0))
            for target in targets:
                results["plain"].append(pool_plain(target, conc, rounds[target]))
            add_deltas(results["plain"], conc)

        # -- streams -----------------------------------------------------------------------------
        # The 200 and 1000 stream runs, then the "many streams" run(s) with a longer interval
        # between chunks, so that 5000 streams make about as many events a second as 1000 do.
        runs = [(conc, SETTINGS["stream_targets"], SETTINGS["stream_rounds"], SETTINGS["stream_interval_ms"])
                for conc in SETTINGS["stream_concurrency"]]
        runs += [(conc, SETTINGS["many_targets"], SETTINGS["many_rounds"], SETTINGS["many_interval_ms"])
                 for conc in SETTINGS["many_streams"]]
        for conc, targets, n_rounds, interval in runs:
            if not targets:
                continue
            rounds = {t: [] for t in targets}
            for rnd in range(n_rounds):
                for target in rotate(targets, rnd):
                    one = measure_stream(ctx, target, conc, interval)
                    rounds[target].append(one)
                    log("stream c=%d/%dms %-10s round %d: %5d streams ttfc p50 %.2f ms p99 %.2f ms gap p99 %.1f max %.1f ms cpu/event %s us peak rss %.1f MiB errors %d gen %.2f bg %.2f"
                        % (conc, interval, target, rnd + 1, one["streams"], (one["ttfc_us"]["p50"] or 0) / 1000,
                           (one["ttfc_us"]["p99"] or 0) / 1000, one["gap_ms"]["p99"] or 0, one["gap_ms"]["max"] or 0,
                           one["cpu_us_per_event"], one["peak_rss_kb"] / 1024, one["errors"],
                           one["loadgen_cpu_util"] or 0, one["window"]["background_cpu_util"] or 0))
            for target in targets:
                results["stream"].append(pool_stream(target, conc, interval, rounds[target]))
            add_stream_deltas(results["stream"], conc)

        time.sleep(1.0)
        after = {}
        if "proxy" in owners:
            after["proxy_rss_kb"] = status_kb(owners["proxy"].pid, "VmRSS")
            after["proxy_pss_kb"] = pss_kb(owners["proxy"].pid)
        if "nginx" in owners:
            after["nginx_rss_kb"] = sum(status_kb(p, "VmRSS") for p in owners["nginx"].pids())
            after["nginx_pss_kb"] = sum(pss_kb(p) or 0 for p in owners["nginx"].pids())
        results["footprint"]["after_load"] = after
        for p in procs:
            if not p.alive():
                raise BenchError("%s exited during the run" % p.name)
    finally:
        for p in reversed(procs):
            # nginx: QUIT is its graceful stop; the proxy and the mock stop on TERM.
            p.stop(signal.SIGQUIT if p.name == "nginx" else signal.SIGTERM)
        if SETTINGS["keep_workdir"]:
            log("work dir kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results["growth"] = growth(results)
    results["targets"] = check_targets(results)
    results["meta"]["elapsed_s"] = round(time.monotonic() - T0, 1)
    out = SETTINGS["out"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print_table(results)
    print("\nJSON: %s   (driver time %.0f s)" % (out, results["meta"]["elapsed_s"]))


def rotate(items, n):
    n %= len(items)
    return items[n:] + items[:n]


# (base, feature) rows compared by paired_ratio, so run next to each other.
PAIRS = {("quiet", "proxy"), ("proxy", "limited"), ("limited", "shared"), ("clients1", "clients10k")}


def plain_order(targets, rnd):
    """Round `rnd`'s order of the plain targets: chains of compared neighbours (quiet, proxy,
    limited, shared; clients1, clients10k) stay together, the chains and single targets rotate,
    and on odd rounds each chain runs backwards, so no row always runs first."""
    groups = []
    for t in targets:
        if groups and (groups[-1][-1], t) in PAIRS:
            groups[-1].append(t)
        else:
            groups.append([t])
    groups = rotate(groups, rnd)
    return [t for g in groups for t in (g[::-1] if rnd % 2 else g)]


def measure_plain(ctx, target, conc):
    owner = ctx["owners"][target]
    upstream = ctx["upstreams"][target]
    if owner and owner.log_path and os.path.exists(owner.log_path):
        ctx["offsets"][target] = os.path.getsize(owner.log_path)
    target_pids = owner.pids() if owner else []
    redis = ctx["redis"] if target == "shared" else None
    commands0 = redis_commands(redis.port) if redis else None
    with Window(target_pids, upstream.pids()) as w:
        summary = run_wrk(ctx["ports"][target], conc, SETTINGS["plain_seconds"], ctx["plan"]["loadgen"])
    if redis:
        scripts1, commands1 = redis_commands(redis.port)
        # Less one: the first INFO itself, counted once it has run.
        scripts, commands = scripts1 - commands0[0], commands1 - commands0[1] - 1
    else:
        scripts = commands = None
    statuses = None
    if owner:
        time.sleep(0.1)  # let the last access lines reach the log
        statuses, ctx["offsets"][target] = access_statuses(owner.log_path, target, ctx["offsets"][target])
    reqs = summary["requests"]
    errs = summary["errors"]
    non_2xx = errs["status"]  # wrk counts status >= 400
    if statuses is not None:
        # 499 is the load generator hanging up on requests still in flight when its run ends
        # (wrk closes every connection at once): the client's doing, not an answer.
        non_2xx = max(non_2xx, sum(v for k, v in statuses.items() if not k.startswith("2") and k != "499"))
    return {
        "requests": reqs,
        "duration_s": summary["duration_us"] / 1e6,
        "rps": round(reqs / (summary["duration_us"] / 1e6), 1),
        "latency_us": summary["latency_us"],
        "errors": errs["connect"] + errs["read"] + errs["write"] + errs["timeout"],
        "wrk_errors": errs,
        "non_2xx": non_2xx,
        "access_log_statuses": statuses,
        "window": w.as_dict(owner is not None),
        "target_cpu_s": w.target,
        "upstream_cpu_s": w.upstream,
        "cpu_us_per_request": round(w.target / reqs * 1e6, 2) if owner and reqs else None,
        "redis_scripts": scripts,
        "redis_commands": commands,
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pool_windows(rounds):
    wall = sum(r["window"]["wall_s"] for r in rounds)
    out = {"wall_s": round(wall, 3)}
    for key in ("background_cpu_util", "softirq_cpu_util", "steal_cpu_util"):
        out[key] = round(sum((r["window"][key] or 0) * r["window"]["wall_s"] for r in rounds) / wall, 3) if wall else None
    out["background_cpu_util_max_round"] = max((r["window"]["background_cpu_util"] or 0) for r in rounds)
    return out


def pool_plain(target, conc, rounds):
    reqs = sum(r["requests"] for r in rounds)
    duration = sum(r["duration_s"] for r in rounds)
    target_cpu = sum(r["target_cpu_s"] for r in rounds)
    up_cpu = sum(r["upstream_cpu_s"] for r in rounds)
    lat = {k: median([r["latency_us"][k] for r in rounds]) for k in ("p50", "p90", "p99", "p999")}
    lat["max"] = max(r["latency_us"]["max"] for r in rounds)
    return {
        "target": target,
        "concurrency": conc,
        "rounds": len(rounds),
        "requests": reqs,
        "rps": round(reqs / duration, 1) if duration else 0,
        "latency_us": lat,
        "errors": sum(r["errors"] for r in rounds),
        "non_2xx": sum(r["non_2xx"] for r in rounds),
        "cpu_us_per_request": round(target_cpu / reqs * 1e6, 2) if target != "direct" and reqs else None,
        "upstream_cpu_us_per_request": round(up_cpu / reqs * 1e6, 2) if reqs else None,
        "redis_scripts_per_request": (round(sum(r["redis_scripts"] for r in rounds) / reqs, 3)
                                      if reqs and rounds[0]["redis_scripts"] is not None else None),
        "redis_commands_per_request": (round(sum(r["redis_commands"] for r in rounds) / reqs, 3)
                                       if reqs and rounds[0]["redis_commands"] is not None else None),
        "window": pool_windows(rounds),
        "per_round": [
            {k: r[k] for k in ("requests", "rps", "latency_us", "errors", "non_2xx", "cpu_us_per_request", "window", "access_log_statuses", "wrk_errors", "redis_scripts", "redis_commands")}
            for r in rounds
        ],
    }


def measure_stream(ctx, target, conc, interval_ms):
    owner = ctx["owners"][target]
    upstream = ctx["upstreams"][target]
    target_pids = owner.pids() if owner else []
    rss_pids = target_pids or upstream.pids()
    hwm_reset = reset_hwm(rss_pids)
    if owner and owner.log_path and os.path.exists(owner.log_path):
        ctx["offsets"][target] = os.path.getsize(owner.log_path)
    rss_before = sum(status_kb(p, "VmRSS") for p in rss_pids)
    with Window(target_pids, upstream.pids()) as w:
        summary = run_sse(ctx["ports"][target], conc, SETTINGS["stream_seconds"], interval_ms, ctx["plan"]["loadgen"],
                          rss_pids)
    hwm = sum(status_kb(p, "VmHWM") for p in rss_pids) if hwm_reset else None
    rss_after = sum(status_kb(p, "VmRSS") for p in rss_pids)
    statuses = None
    if owner:
        time.sleep(0.1)
        statuses, ctx["offsets"][target] = access_statuses(owner.log_path, target, ctx["offsets"][target])
    events = summary["events_all"]
    non_2xx = summary["non_2xx"]
    if statuses is not None:
        non_2xx = max(non_2xx, sum(v for k, v in statuses.items() if not k.startswith("2")))
    return {
        "streams": summary["streams_ok"],
        "events": events,
        "content_chunks": summary["content_chunks"],
        "ttfc_us": summary["ttfc_us"],
        "gap_ms": summary["gap_ms"],
        "errors": summary["errors"],
        "non_2xx": non_2xx,
        "error_kinds": summary["error_kinds"],
        "access_log_statuses": statuses,
        "window": w.as_dict(owner is not None),
        "target_cpu_s": w.target,
        "upstream_cpu_s": w.upstream,
        "loadgen_cpu_util": summary["loadgen_cpu_util"],
        "cpu_us_per_event": round(w.target / events * 1e6, 2) if owner and events else None,
        "peak_rss_kb": max(summary["peak_rss_sampled_kb"] or 0, hwm or 0),
        "peak_rss_sampled_kb": summary["peak_rss_sampled_kb"],
        "vmhwm_sum_kb": hwm,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
    }


def pool_stream(target, conc, interval_ms, rounds):
    events = sum(r["events"] for r in rounds)
    target_cpu = sum(r["target_cpu_s"] for r in rounds)
    up_cpu = sum(r["upstream_cpu_s"] for r in rounds)
    errors = {}
    for r in rounds:
        for k, v in r["error_kinds"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "target": target,
        "concurrency": conc,
        "chunks": SETTINGS["stream_chunks"],
        "interval_ms": interval_ms,
        "rounds": len(rounds),
        "streams": sum(r["streams"] for r in rounds),
        "events": events,
        "ttfc_us": {k: median([r["ttfc_us"][k] for r in rounds]) for k in ("p50", "p90", "p99")}
        | {"max": max((r["ttfc_us"]["max"] or 0) for r in rounds)},
        "gap_ms": {k: median([r["gap_ms"][k] for r in rounds]) for k in ("p50", "p99", "p999")}
        | {"max": max((r["gap_ms"]["max"] or 0) for r in rounds)},
        "errors": sum(r["errors"] for r in rounds),
        "non_2xx": sum(r["non_2xx"] for r in rounds),
        "error_kinds": errors,
        "cpu_us_per_event": round(target_cpu / events * 1e6, 2) if target != "direct" and events else None,
        "upstream_cpu_us_per_event": round(up_cpu / events * 1e6, 2) if events else None,
        "rss_of": "target" if target != "direct" else "upstream",
        "peak_rss_kb": max(r["peak_rss_kb"] for r in rounds),
        "loadgen_cpu_util": max((r["loadgen_cpu_util"] or 0) for r in rounds),
        "window": pool_windows(rounds),
        "per_round": [
            {k: r[k] for k in ("streams", "events", "ttfc_us", "gap_ms", "errors", "non_2xx", "cpu_us_per_event",
                               "peak_rss_kb", "vmhwm_sum_kb", "peak_rss_sampled_kb", "rss_before_kb", "rss_after_kb",
                               "loadgen_cpu_util", "window", "access_log_statuses", "error_kinds")}
            for r in rounds
        ],
    }


def versions():
    out = {"python": platform.python_version()}
    try:
        out["nginx"] = subprocess.run([NGINX_BIN, "-v"], capture_output=True, text=True).stderr.strip()
    except OSError:
        pass
    try:
        out["wrk"] = subprocess.run([WRK_BIN, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    try:
        out["proxy_binary_mtime_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(PROXY_BIN)))
    except OSError:
        pass
    try:
        out["git_head"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], capture_output=True, text=True).stdout
        out["src_dirty"] = bool(dirty.strip())
    except OSError:
        pass
    return out


def find(entries, target, conc):
    for e in entries:
        if e["target"] == target and e["concurrency"] == conc:
            return e
    return None


def add_deltas(entries, conc):
    """Latency added to "direct" by each target on the same (plain HTTP) upstream."""
    direct = find(entries, "direct", conc)
    for t in ("nginx",) + PROXIES:
        e = find(entries, t, conc)
        if e and direct and t not in H2_TARGETS:
            e["added_latency_us"] = {
                k: e["latency_us"][k] - direct["latency_us"][k] for k in ("p50", "p90", "p99")
            }


def add_stream_deltas(entries, conc):
    direct = find(entries, "direct", conc)
    for t in ("nginx",) + PROXIES:
        e = find(entries, t, conc)
        if (e and direct and t not in H2_TARGETS and direct["ttfc_us"]["p50"] is not None
                and e["ttfc_us"]["p50"] is not None):
            e["added_ttfc_us"] = {k: round(e["ttfc_us"][k] - direct["ttfc_us"][k], 1) for k in ("p50", "p99")}
            e["added_gap_max_ms"] = round(e["gap_ms"]["max"] - direct["gap_ms"]["max"], 3)


# ------------------------------------------------------------------------------------------------
# How cost grows


def rss_reference(r):
    """(the 1000-stream run's concurrency, the many-stream run's), the pair KB per stream is
    taken between: the largest of BENCH_STREAM_CONCURRENCY and the largest of BENCH_MANY_STREAMS."""
    lo = max(SETTINGS["stream_concurrency"]) if SETTINGS["stream_concurrency"] else None
    hi = max(SETTINGS["many_streams"]) if SETTINGS["many_streams"] else None
    return lo, hi


def growth(r):
    """How the cost grows with the number of open streams (CPU per chunk, peak RSS, KB per open
    stream) and with the number of clients in the clients file (CPU per request)."""
    out = {"streams": {}, "clients": {}}
    concs = sorted({e["concurrency"] for e in r["stream"]})
    lo, hi = rss_reference(r)
    idle = {"nginx": r["footprint"].get("startup_nginx"), "proxy": r["footprint"].get("startup_proxy")}
    for t in ("nginx", "proxy", "proxy-h2", "direct"):
        rows = [e for e in (find(r["stream"], t, c) for c in concs) if e]
        if not rows:
            continue
        g = {"by_streams": [{"streams": e["concurrency"], "interval_ms": e["interval_ms"],
                             "cpu_us_per_event": e["cpu_us_per_event"], "peak_rss_kb": e["peak_rss_kb"]}
                            for e in rows]}
        a, b = (find(r["stream"], t, lo), find(r["stream"], t, hi)) if lo and hi else (None, None)
        if a and b and hi > lo:
            g["kb_per_stream_%d_to_%d" % (lo, hi)] = round((b["peak_rss_kb"] - a["peak_rss_kb"]) / (hi - lo), 1)
        ref = idle.get("nginx" if t == "nginx" else "proxy") if t != "direct" else None
        if b and ref:
            g["idle_rss_kb"] = ref["idle_rss_kb_median"]
            g["kb_per_stream_from_idle_%d" % hi] = round((b["peak_rss_kb"] - ref["idle_rss_kb_median"]) / hi, 1)
        out["streams"][t] = g
    for conc in SETTINGS["plain_concurrency"]:
        one, many = find(r["plain"], "clients1", conc), find(r["plain"], "clients10k", conc)
        if one and many and one["cpu_us_per_request"] and many["cpu_us_per_request"]:
            out["clients"][str(conc)] = {
                "clients": [1, SETTINGS["clients"]],
                "cpu_us_per_request": [one["cpu_us_per_request"], many["cpu_us_per_request"]],
                "ratio_pooled": round(many["cpu_us_per_request"] / one["cpu_us_per_request"], 3),
                "ratio": round(paired_ratio(one, many), 3),
                "p50_us": [one["latency_us"]["p50"], many["latency_us"]["p50"]],
                "p99_us": [one["latency_us"]["p99"], many["latency_us"]["p99"]],
            }
    return out


def paired_ratio(base, with_feature):
    """CPU per request of `with_feature` over `base`: the median over rounds of the ratio within
    each round, where the two ran back to back (see plain_order). A shared VM's speed drifts
    by more than 5% from one round to the next at c=32 even with nothing else running; within a
    round it mostly cancels out."""
    if not (base and with_feature and base["cpu_us_per_request"] and with_feature["cpu_us_per_request"]):
        return None
    ratios = [w["cpu_us_per_request"] / b["cpu_us_per_request"]
              for b, w in zip(base["per_round"], with_feature["per_round"])
              if b["cpu_us_per_request"] and w["cpu_us_per_request"]]
    return statistics.median(ratios) if ratios else None


# ------------------------------------------------------------------------------------------------
# Targets

NOISY_BG = 0.15  # cores used by other processes in a round above which its figures are noise


def check_targets(r):
    """The issue's targets (PASS/FAIL) and the figures it asks to be reported (pass None)."""
    targets = []

    def add(name, passed, measured, limit, ratio, note="", entries=()):
        bg = max([e["window"]["background_cpu_util_max_round"] for e in entries if e] or [0])
        reliable = bg <= NOISY_BG
        if not reliable:
            note = (note + "; " if note else "") + "NOISY: other processes used up to %.2f cores in a round" % bg
        targets.append(
            {"target": name, "pass": None if passed is None else bool(passed), "measured": measured, "limit": limit,
             "ratio": None if ratio is None else round(ratio, 3), "note": note, "reliable": reliable}
        )

    # CPU against nginx, in the same run.
    for conc in SETTINGS["plain_concurrency"]:
        p, n = find(r["plain"], "proxy", conc), find(r["plain"], "nginx", conc)
        limit = 1.3 if conc == 1 else 2.5
        if p and n and n["cpu_us_per_request"]:
            ratio = p["cpu_us_per_request"] / n["cpu_us_per_request"]
            add("CPU per plain request, c=%d: proxy <= %g x nginx" % (conc, limit), ratio <= limit,
                "%.1f us" % p["cpu_us_per_request"], "%g x %.1f us" % (limit, n["cpu_us_per_request"]), ratio,
                entries=(p, n))
    for e in r["stream"]:
        if e["target"] not in ("proxy",) + H2_TARGETS:
            continue
        n = find(r["stream"], "nginx", e["concurrency"])
        if not (n and n["cpu_us_per_event"] and e["cpu_us_per_event"]):
            continue
        ratio = e["cpu_us_per_event"] / n["cpu_us_per_event"]
        scored = e["target"] == "proxy" and e["concurrency"] in SETTINGS["stream_concurrency"]
        via = " (HTTP/2 over TLS upstream; nginx's is plain HTTP/1.1)" if e["target"] in H2_TARGETS else ""
        add("CPU per streamed chunk, %d streams: %s%s" % (
                e["concurrency"], e["target"], " <= 1.3 x nginx" if scored else " vs nginx"),
            ratio <= 1.3 if scored else None, "%.1f us" % e["cpu_us_per_event"],
            ("1.3 x " if scored else "nginx ") + "%.1f us" % n["cpu_us_per_event"], ratio,
            ("%d ms between chunks" % e["interval_ms"]) + via, entries=(e, n))

    # Memory.
    lo, hi = rss_reference(r)
    for t, limit, via in (("proxy-h2", 40, "HTTP/2 (TLS)"), ("proxy", 45, "HTTP/1")):
        e = find(r["stream"], t, lo) if lo else None
        if e:
            n = find(r["stream"], "nginx", lo)
            add("Peak RSS, %d streams via an %s upstream <= %d MiB" % (lo, via, limit), e["peak_rss_kb"] <= limit * 1024,
                "%.1f MiB" % (e["peak_rss_kb"] / 1024), "%d MiB" % limit, e["peak_rss_kb"] / (limit * 1024),
                "%s; nginx (master+workers, RSS sum) %.1f MiB" % (t, n["peak_rss_kb"] / 1024) if n else t)
    for t, g in r["growth"]["streams"].items():
        if t == "direct" or not (lo and hi):
            continue
        b = find(r["stream"], t, hi)
        per = g.get("kb_per_stream_%d_to_%d" % (lo, hi))
        if b and per is not None:
            add("Peak RSS, %d open streams: %s" % (hi, t), None, "%.1f MiB" % (b["peak_rss_kb"] / 1024), "-", None,
                "%.1f KB per stream from %d to %d; %s KB per stream from idle" % (
                    per, lo, hi, fmt(g.get("kb_per_stream_from_idle_%d" % hi))))

    # Features, each against the plain proxy (or the row it adds to) in the same run.
    for conc in SETTINGS["plain_concurrency"]:
        for base_t, with_t, what in (("proxy", "limited", "client limits (per-minute, concurrency, budget, models)"),
                                     ("quiet", "proxy", "the access line (LOG_LEVEL=info vs error)"),
                                     ("clients1", "clients10k", "%d clients in the file instead of 1" % SETTINGS["clients"])):
            b, w = find(r["plain"], base_t, conc), find(r["plain"], with_t, conc)
            ratio = paired_ratio(b, w)
            if ratio is not None:
                add("CPU per request, c=%d: %s vs %s <= +5%%" % (conc, with_t, base_t), ratio <= 1.05,
                    "%+.1f%%" % ((ratio - 1) * 100), "+5%", ratio,
                    "%s; median of %d rounds' ratios; pooled %.1f vs %.1f us" % (
                        what, len(w["per_round"]), w["cpu_us_per_request"], b["cpu_us_per_request"]),
                    entries=(b, w))
        l, sh = find(r["plain"], "limited", conc), find(r["plain"], "shared", conc)
        if l and sh and l["cpu_us_per_request"] and sh["cpu_us_per_request"]:
            add("Limits in Redis, c=%d: shared vs limited" % conc, None,
                "%+.1f us CPU/req" % (sh["cpu_us_per_request"] - l["cpu_us_per_request"]), "-",
                sh["cpu_us_per_request"] / l["cpu_us_per_request"],
                "%+d us p50, %+d us p99; CPU of the proxy and redis-server together" % (
                    sh["latency_us"]["p50"] - l["latency_us"]["p50"], sh["latency_us"]["p99"] - l["latency_us"]["p99"]),
                entries=(l, sh))
    for e in r["plain"]:
        if e["target"] == "shared" and e.get("redis_scripts_per_request") is not None:
            add("Redis round trips per request, c=%d: shared" % e["concurrency"], None,
                "%.2f" % e["redis_scripts_per_request"], "-", None,
                "EVAL/EVALSHA calls the redis-server ran / requests (llm-proxy sends nothing else per request: the "
                "decision before the call, the settlement after it); %.1f commands with those inside the scripts"
                % e["redis_commands_per_request"])

    # Latency at c=1, as the issue asks: reported.
    p, n, d = (find(r["plain"], t, 1) for t in ("proxy", "nginx", "direct"))
    if p and n and d and "added_latency_us" in p:
        add("Added latency c=1: proxy p99 (p50)", None,
            "%d us (%d us)" % (p["added_latency_us"]["p99"], p["added_latency_us"]["p50"]), "-", None,
            "nginx adds %d us (%d us); direct p99 %d us" % (
                n["added_latency_us"]["p99"], n["added_latency_us"]["p50"], d["latency_us"]["p99"]),
            entries=(p, n, d))

    # Footprint.
    su = r["footprint"].get("startup_proxy")
    sn = r["footprint"].get("startup_nginx")
    if su:
        add("Idle RSS <= 10 MiB", su["idle_rss_kb_median"] <= 10 * 1024,
            "%.1f MiB" % (su["idle_rss_kb_median"] / 1024), "10 MiB", su["idle_rss_kb_median"] / (10 * 1024),
            "nginx %.1f MiB RSS / %.1f MiB PSS" % (sn["idle_rss_kb_median"] / 1024, sn["idle_pss_kb_median"] / 1024) if sn else "")
        add("Start-up (spawn -> first response) < 50 ms", su["first_response_ms_median"] < 50,
            "%.1f ms" % su["first_response_ms_median"], "50 ms", su["first_response_ms_median"] / 50.0,
            "median of %d; first accepted connect %.1f ms; nginx %.1f ms" % (
                su["tries"], su["connect_ms_median"], sn["first_response_ms_median"] if sn else float("nan")))

    # Errors, in every run of every target (direct and nginx too: a failing floor voids the run).
    runs = r["plain"] + r["stream"]
    bad = [(e["target"], e["concurrency"], e["errors"], e["non_2xx"]) for e in runs if e["errors"] or e["non_2xx"]]
    add("Zero errors and zero non-2xx in every run", not bad,
        "%d errors, %d non-2xx" % (sum(e["errors"] for e in runs), sum(e["non_2xx"] for e in runs)),
        "0", None, "%d runs" % len(runs) if not bad else "runs (target, concurrency, errors, non-2xx): %s" % bad)
    return targets


# ------------------------------------------------------------------------------------------------
# Table


def fmt(v, spec="%.1f"):
    return "-" if v is None else spec % v


def print_table(r):
    m = r["meta"]
    print("llm-proxy benchmark  %s  pinning=%s workers=%d priority=%s"
          % (m["started_utc"], m["pinning"]["mode"], m["workers"], m["priority"]))
    print("proxy log: %s; nginx access_log: %s" % (m["proxy_log"], m["nginx_access_log"]))
    print()
    if r["plain"]:
        print("Plain chat completions (wrk -t1; %d rounds of %gs per target, targets interleaved, after %gs warm-up;"
              " req/s and CPU pooled, percentiles = median of rounds)" % (SETTINGS["rounds"], SETTINGS["plain_seconds"], SETTINGS["warmup_seconds"]))
        hdr = "%-10s %5s %9s %8s %8s %9s %9s %11s %11s %6s %7s %5s" % (
            "target", "conc", "req/s", "p50 us", "p99 us", "+p50 us", "+p99 us", "cpu us/req", "mock us/req", "errors", "non2xx", "bg")
        print(hdr)
        print("-" * len(hdr))
        for e in r["plain"]:
            add = e.get("added_latency_us", {})
            print("%-10s %5d %9.0f %8d %8d %9s %9s %11s %11s %6d %7d %5.2f" % (
                e["target"], e["concurrency"], e["rps"], e["latency_us"]["p50"], e["latency_us"]["p99"],
                fmt(add.get("p50"), "%d"), fmt(add.get("p99"), "%d"), fmt(e["cpu_us_per_request"]),
                fmt(e["upstream_cpu_us_per_request"]), e["errors"], e["non_2xx"], e["window"]["background_cpu_util"] or 0))
        print("(quiet = proxy with LOG_LEVEL=error, no access line; limited = the token as a clients-file client with"
              " limits and a model list; shared = limited with REDIS_URL, the limits in Redis; clients1/clients10k ="
              " the token as a client without limits, alone or among %d)" % SETTINGS["clients"])
        for conc in SETTINGS["plain_concurrency"]:
            for base_t, with_t, what in (("proxy", "limited", "client limits"), ("quiet", "proxy", "access line"),
                                         ("clients1", "clients10k", "%d clients" % SETTINGS["clients"]),
                                         ("limited", "shared", "limits in Redis")):
                b, w = find(r["plain"], base_t, conc), find(r["plain"], with_t, conc)
                if b and w and b["cpu_us_per_request"] and w["cpu_us_per_request"]:
                    extra = ""
                    if with_t == "shared":
                        extra = ", %+d us p50, %+d us p99, %s Redis round trips per request" % (
                            w["latency_us"]["p50"] - b["latency_us"]["p50"], w["latency_us"]["p99"] - b["latency_us"]["p99"],
                            fmt(w.get("redis_scripts_per_request"), "%.2f"))
                    print("  c=%-3d %-16s %+6.1f us CPU per request (%s %.1f vs %s %.1f; %+.1f%%, paired rounds %+.1f%%)%s" % (
                        conc, what + ":", w["cpu_us_per_request"] - b["cpu_us_per_request"], with_t,
                        w["cpu_us_per_request"], base_t, b["cpu_us_per_request"],
                        (w["cpu_us_per_request"] / b["cpu_us_per_request"] - 1) * 100,
                        (paired_ratio(b, w) - 1) * 100, extra))
        print()
    if r["stream"]:
        print("SSE streams (loadgen sse; %d chunks per stream = %d events, 'ms' apart; %gs of new streams per run;"
              " rounds: %d, %d for the many-stream run; percentiles = median of rounds, max = max)" % (
            SETTINGS["stream_chunks"], SETTINGS["stream_chunks"] + 3, SETTINGS["stream_seconds"],
            SETTINGS["stream_rounds"], SETTINGS["many_rounds"]))
        hdr = "%-10s %5s %4s %7s %8s %9s %9s %9s %9s %8s %8s %11s %9s %6s %7s %5s %5s" % (
            "target", "conc", "ms", "streams", "events", "ttfc p50", "ttfc p99", "+ttfc p50", "+ttfc p99", "gap p99", "gap max",
            "cpu us/chk", "peak RSS", "errors", "non2xx", "gen", "bg")
        print(hdr)
        print("%-10s %5s %4s %7s %8s %9s %9s %9s %9s %8s %8s %11s %9s" % ("", "", "", "", "", "ms", "ms", "ms", "ms", "ms", "ms", "", "MiB"))
        print("-" * len(hdr))
        for e in r["stream"]:
            add = e.get("added_ttfc_us", {})
            ms = lambda v: None if v is None else v / 1000.0
            print("%-10s %5d %4d %7d %8d %9s %9s %9s %9s %8s %8s %11s %9s %6d %7d %5.2f %5.2f" % (
                e["target"], e["concurrency"], e["interval_ms"], e["streams"], e["events"], fmt(ms(e["ttfc_us"]["p50"]), "%.2f"),
                fmt(ms(e["ttfc_us"]["p99"]), "%.2f"), fmt(ms(add.get("p50")), "%.2f"), fmt(ms(add.get("p99")), "%.2f"),
                fmt(e["gap_ms"]["p99"]), fmt(e["gap_ms"]["max"]), fmt(e["cpu_us_per_event"]),
                fmt(e["peak_rss_kb"] / 1024.0) + ("*" if e["rss_of"] == "upstream" else ""),
                e["errors"], e["non_2xx"], e["loadgen_cpu_util"] or 0, e["window"]["background_cpu_util"] or 0))
        print("(proxy-h2 = proxy in front of the TLS mock, HTTP/2 by ALPN; its upstream differs, so no +ttfc."
              " * direct: the upstream's own RSS. chk = SSE event forwarded. gen = load generator CPU, 1.0 = one core;"
              " bg = CPU used by other processes on the machine, in cores)")
        print()
    g = r["growth"]
    if g["streams"] or g["clients"]:
        print("How cost grows")
        lo, hi = rss_reference(r)
        for t, s in g["streams"].items():
            if t == "direct":
                continue
            steps = s["by_streams"]
            line = "  %-10s streams %s: CPU per chunk %s us, peak RSS %s MiB" % (
                t, " -> ".join(str(x["streams"]) for x in steps),
                " -> ".join(fmt(x["cpu_us_per_event"]) for x in steps),
                " -> ".join(fmt(x["peak_rss_kb"] / 1024.0) for x in steps))
            per = s.get("kb_per_stream_%d_to_%d" % (lo, hi)) if lo and hi else None
            if per is not None:
                line += "; %.1f KB per stream %d->%d, %s KB per stream from idle" % (
                    per, lo, hi, fmt(s.get("kb_per_stream_from_idle_%d" % hi)))
            print(line)
        for conc, c in g["clients"].items():
            print("  %-10s clients 1 -> %d, c=%s: CPU per request %.1f -> %.1f us (paired rounds %+.1f%%), p50 %d -> %d us" % (
                "clients", SETTINGS["clients"], conc, c["cpu_us_per_request"][0], c["cpu_us_per_request"][1],
                (c["ratio"] - 1) * 100, c["p50_us"][0], c["p50_us"][1]))
        print()
    f = r["footprint"]
    su, sn = f["startup_proxy"], f["startup_nginx"]
    print("Footprint")
    print("%-7s %12s %12s %16s %20s %14s" % ("", "idle RSS MiB", "idle PSS MiB", "start: connect ms", "start: 1st response ms", "binary bytes"))
    print("%-7s %12.1f %12.1f %16.1f %20.1f %14d%s" % (
        "proxy", su["idle_rss_kb_median"] / 1024, su["idle_pss_kb_median"] / 1024, su["connect_ms_median"],
        su["first_response_ms_median"], f["proxy_binary"]["bytes"], " (stripped)" if f["proxy_binary"]["stripped"] else " (NOT stripped)"))
    print("%-7s %12.1f %12.1f %16.1f %20.1f %14d%s" % (
        "nginx", sn["idle_rss_kb_median"] / 1024, sn["idle_pss_kb_median"] / 1024, sn["connect_ms_median"],
        sn["first_response_ms_median"], f["nginx_binary"]["bytes"],
        " (+ shared libs; master + %s workers)" % f.get("nginx_worker_processes", "?")))
    a = f.get("after_load", {})
    if "proxy_rss_kb" in a and "nginx_rss_kb" in a:
        print("after all load, idle: proxy RSS %.1f MiB (PSS %.1f), nginx RSS %.1f MiB (PSS %.1f)" % (
            a["proxy_rss_kb"] / 1024, (a["proxy_pss_kb"] or 0) / 1024, a["nginx_rss_kb"] / 1024, a["nginx_pss_kb"] / 1024))
    print()
    print("Targets")
    for t in r["targets"]:
        mark = "INFO" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print("%-5s %-62s %-20s vs %-18s %s%s" % (
            mark + ("" if t.get("reliable", True) else "?"), t["target"], t["measured"], t["limit"],
            "ratio %.2f" % t["ratio"] if t["ratio"] is not None else "",
            ("  (%s)" % t["note"]) if t["note"] else ""))
    if any(not t.get("reliable", True) for t in r["targets"]):
        print("(PASS?/FAIL?/INFO?: measured while other processes were busy -- see the note)")
    noisy = [e for e in r["plain"] + r["stream"] if (e["window"]["background_cpu_util"] or 0) > NOISY_BG]
    if noisy:
        print("\nWARNING: other processes used > %.2f core during %d run(s) (column bg): those figures are noisy." % (
            NOISY_BG, len(noisy)))


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        log("FAILED: %s" % err)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
