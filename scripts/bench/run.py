#!/usr/bin/env python3
"""Benchmark driver behind scripts/bench.sh: direct vs nginx vs llm-proxy, on loopback.

The proxy runs three times: "proxy" (the benchmark token in ALLOWED_TOKENS, no limits),
"limited" (the same token as a clients-file client with limits far above the load and a model
list), and "shared" (the same client, its limits kept in a Redis started for the run: REDIS_URL),
so the table shows side by side what a client's limits cost per request (reading the body for its
model, the model check, the charge before the call and the settlement from `usage` after it) and
what keeping them in Redis adds (one round trip per decision; the CPU of the redis-server is
counted with the "shared" proxy's, since a deployment pays for both).

Started by scripts/bench.sh once nginx, wrk and the release binaries are in place; it can be run
on its own with the same environment. Python 3 standard library only.

Phases, each target measured back to back in the same run:
  1. footprint: stripped binary size; start-up time (spawn -> first accepted TCP connection, and
     -> first HTTP response, a 401 that needs no upstream) and idle RSS/PSS of fresh instances;
  2. plain chat completions with wrk at each BENCH_PLAIN_CONCURRENCY (1 and 32): req/s, latency
     p50/p99, added latency versus direct, CPU time per request of the proxy under test;
  3. SSE streams with `loadgen sse` (tools/loadgen) at each BENCH_STREAM_CONCURRENCY (200 and 1000):
     time to first chunk, gaps between chunks, CPU time per forwarded chunk, peak RSS, errors.
Then it checks the targets (ratios against nginx measured in the same run), prints a table to
stdout and writes everything to BENCH_OUT (default target/bench/results.json).

Exit status: 0 when the benchmark ran, whatever the targets say; 1 when it could not run
(a process did not start, a load generator failed, ...).

CPU pinning (BENCH_PIN, default "split") -- only 2 cores, so a compromise:
  * "split": the load generator alone on CPU 0; the system under test (the mock upstream and the
    proxy being measured, nginx or llm-proxy) on CPU 1. The load generator then never competes
    with what it measures, and every target -- direct included -- gets the same single core to
    share with the upstream, so req/s at concurrency 32 is "one core's worth of upstream + proxy"
    and CPU-per-request is not muddied by idle cores spinning. Worker counts: each side keeps the
    deployment default of 2 (WORKER_THREADS=2 for llm-proxy, which would otherwise size its
    runtime from the 1-CPU affinity mask; `worker_processes 2` for nginx), so the multi-worker
    overhead (tokio's work stealing and parking, nginx's accept wake-ups) is still paid, but
    without cross-core wake-ups; the upstream is left at its own default (1 worker on 1 CPU).
    Caveats: two workers time-share one core, so a stall in one worker shows up as latency; on a
    real 2-core box the proxy would also pay inter-processor wake-ups (see "none"). At 1000
    streams (~21k events/s) the upstream and the proxy together need about a core, so CPU 1 is at
    or near saturation: time to first chunk and gaps there include queueing for that core (CPU
    per chunk and RSS do not). The load generator's own core should not be saturated (column
    gen); whatever its single-threaded runtime adds to the times is in the "direct" floor too.
  * "none": no pinning; everything floats over both cores (closest to an operator's box, noisier:
    the load generator and the upstream take CPU from the proxy, differently for each target).
BENCH_WORKERS overrides the worker count of both proxies (nginx worker_processes and
WORKER_THREADS); unset, it is 2.

The machine may be shared (other builds running): each run records the CPU time that processes
outside the benchmark used meanwhile ("background_cpu_util"); when it is high, the run is noisy,
and the table says so.
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


class BenchError(Exception):
    pass


def log(msg):
    sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - T0, msg))
    sys.stderr.flush()


T0 = time.monotonic()

# ------------------------------------------------------------------------------------------------
# Settings

SETTINGS = {
    "plain_seconds": env_float("BENCH_SECONDS", 5.0),
    "rounds": max(1, env_int("BENCH_ROUNDS", 3)),
    "warmup_seconds": env_float("BENCH_WARMUP_SECONDS", 2.0),
    "stream_seconds": env_float("BENCH_STREAM_SECONDS", 8.0),
    "stream_rounds": max(1, env_int("BENCH_STREAM_ROUNDS", 2)),
    "plain_concurrency": env_list("BENCH_PLAIN_CONCURRENCY", [1, 32]),
    "stream_concurrency": env_list("BENCH_STREAM_CONCURRENCY", [200, 1000]),
    "stream_chunks": env_int("BENCH_CHUNKS", 20),
    "stream_interval_ms": env_int("BENCH_INTERVAL_MS", 50),
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

TARGETS = ["direct", "nginx", "proxy", "limited", "shared"]
# Every llm-proxy instance.
PROXIES = ("proxy", "limited", "shared")
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


def start_mock(workdir, cpus):
    out_path = os.path.join(workdir, "mock.out")
    out = open(out_path, "w")
    popen = subprocess.Popen(
        pinned([MOCK_BIN, "--host", "127.0.0.1", "--port", "0", "--no-record"], cpus),
        stdout=out,
        stderr=open(os.path.join(workdir, "mock.err"), "w"),
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(out_path) as f:
            m = re.search(r"listening on http://[^\s:]+:(\d+)", f.read())
        if m:
            return Proc("mock", popen, int(m.group(1)))
        if popen.poll() is not None:
            break
        time.sleep(0.01)
    popen.kill()
    raise BenchError("mock-upstream did not start (see %s)" % out_path)


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


def proxy_env(upstream_port, port, workers, clients_file=None, state_dir=None, redis_port=None):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TARGET_HOST": "http://127.0.0.1:%d" % upstream_port,
        "AUTH_BEARER": UPSTREAM_KEY,
        "PROXY_PORT": str(port),
        "LOG_LEVEL": "info",
        "AUTH_VALIDATION": "true",
        "ALLOWED_TOKENS": CLIENT_TOKEN,
    }
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


def start_proxy(workdir, upstream_port, cpus, workers, name="proxy", redis=None):
    # A port chosen here rather than PROXY_PORT=0 and the "listening on" line: works whatever the
    # log level and with the log discarded (the race for the port is harmless on loopback).
    port = free_port()
    log_path = os.path.join(workdir, "%s.log" % name)
    clients_file = state_dir = None
    if name in ("limited", "shared"):
        clients_file = os.path.join(workdir, "clients-%s.toml" % name)
        with open(clients_file, "w") as f:
            f.write(LIMITED_CLIENTS % CLIENT_TOKEN)
        state_dir = os.path.join(workdir, "%s-state" % name)
    popen = subprocess.Popen(
        pinned([PROXY_BIN], cpus),
        env=proxy_env(upstream_port, port, workers, clients_file, state_dir,
                      redis.port if redis else None),
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


def measure_startup(kind, workdir, upstream_port, cpus, workers, tries):
    """Spawn -> first accepted connection (connect() succeeds) and -> first HTTP response."""
    results = []
    for i in range(tries):
        port = free_port()
        if kind == "proxy":
            t0 = time.perf_counter()
            popen = subprocess.Popen(
                pinned([PROXY_BIN], cpus),
                env=proxy_env(upstream_port, port, workers),
                cwd=os.path.join(workdir, "proxy-cwd"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=proxy_log_target(os.path.join(workdir, "proxy-startup.log")),
            )
        else:
            conf_popen = spawn_nginx  # same command as the benchmarked instance
            t0 = time.perf_counter()
            popen, _ = conf_popen(workdir, "startup", port, upstream_port, cpus, workers)
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


def run_sse(port, concurrency, seconds, cpus, rss_pids):
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
            "1.0",
            "--chunks",
            str(SETTINGS["stream_chunks"]),
            "--interval-ms",
            str(SETTINGS["stream_interval_ms"]),
        ]
        + [x for p in rss_pids for x in ("--pid", str(p))],
        cpus,
    )
    env = dict(os.environ, BENCH_CLIENT_TOKEN=CLIENT_TOKEN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise BenchError("loadgen sse failed (%d): %s" % (proc.returncode, proc.stderr.strip()[-2000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def main():
    priority = boost_priority()
    plan = cpu_plan()
    workers = SETTINGS["workers"]
    for path, what in ((PROXY_BIN, "llm-proxy"), (MOCK_BIN, "mock-upstream"), (LOADGEN_BIN, "loadgen"), (NGINX_BIN, "nginx")):
        if not os.access(path, os.X_OK):
            raise BenchError("%s not found at %s" % (what, path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * max(SETTINGS["stream_concurrency"] + [64]) + 256
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
    log("work dir %s, pinning %s, workers %d" % (workdir, plan["mode"], workers))
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
            "proxy_env": {k: v for k, v in proxy_env(0, 0, workers).items() if k not in ("PATH", "HOME", "AUTH_BEARER", "ALLOWED_TOKENS", "TARGET_HOST", "PROXY_PORT")},
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
                kind, workdir, mock.port, plan["sut"], workers, SETTINGS["startup_tries"]
            )

        nginx = start_nginx(workdir, mock.port, plan["sut"], workers)
        procs.append(nginx)
        proxy = start_proxy(workdir, mock.port, plan["sut"], workers)
        procs.append(proxy)
        limited = start_proxy(workdir, mock.port, plan["sut"], workers, "limited")
        procs.append(limited)
        redis = start_redis(workdir, plan["sut"])
        procs.append(redis)
        shared = start_proxy(workdir, mock.port, plan["sut"], workers, "shared", redis)
        procs.append(shared)
        time.sleep(0.3)
        for p in (nginx, proxy, limited, shared):
            status = http_probe(p.port)
            if status != 401:
                raise BenchError("%s answered %s to a request without a token, not 401" % (p.name, status))
        names = thread_names(proxy.pid)
        results["footprint"]["proxy_threads_at_start"] = {
            "total": len(names),
            "tokio_workers": sum(1 for n in names if n.startswith("tokio-runtime-w")),
        }
        results["footprint"]["nginx_worker_processes"] = len(nginx.pids()) - 1
        log("nginx on %d (pids %s), llm-proxy on %d (pid %d, threads %s)"
            % (nginx.port, nginx.pids(), proxy.port, proxy.pid, names))
        ports = {"direct": mock.port, "nginx": nginx.port, "proxy": proxy.port,
                 "limited": limited.port, "shared": shared.port}
        owners = {"direct": None, "nginx": nginx, "proxy": proxy, "limited": limited, "shared": shared}
        log_offsets = {"nginx": 0, "proxy": 0, "limited": 0, "shared": 0}

        ctx = {"ports": ports, "owners": owners, "mock": mock, "plan": plan, "offsets": log_offsets}

        # -- plain -------------------------------------------------------------------------------
        # Rounds interleave the targets (rotating their order), so a burst of outside load or a
        # drift of the machine hits all of them alike; figures are pooled (counts, CPU) or the
        # median of the rounds (percentiles).
        for conc in SETTINGS["plain_concurrency"]:
            if SETTINGS["warmup_seconds"] > 0:
                for target in TARGETS:
                    run_wrk(ports[target], conc, SETTINGS["warmup_seconds"], plan["loadgen"])
            rounds = {t: [] for t in TARGETS}
            for rnd in range(SETTINGS["rounds"]):
                for target in rotate(TARGETS, rnd):
                    one = measure_plain(ctx, target, conc)
                    rounds[target].append(one)
                    log("plain c=%d %-6s round %d: %7.0f req/s p50 %5d us p99 %6d us cpu/req %s us errors %d non-2xx %d bg %.2f"
                        % (conc, target, rnd + 1, one["rps"], one["latency_us"]["p50"], one["latency_us"]["p99"],
                           one["cpu_us_per_request"], one["errors"], one["non_2xx"],
                           one["window"]["background_cpu_util"] or 0))
            for target in TARGETS:
                results["plain"].append(pool_plain(target, conc, rounds[target]))
            add_deltas(results["plain"], conc)

        # -- streams -----------------------------------------------------------------------------
        for conc in SETTINGS["stream_concurrency"]:
            rounds = {t: [] for t in TARGETS}
            for rnd in range(SETTINGS["stream_rounds"]):
                for target in rotate(TARGETS, rnd):
                    one = measure_stream(ctx, target, conc)
                    rounds[target].append(one)
                    log("stream c=%d %-6s round %d: %5d streams ttfc p50 %.2f ms p99 %.2f ms gap p99 %.1f max %.1f ms cpu/event %s us peak rss %.1f MiB errors %d gen %.2f bg %.2f"
                        % (conc, target, rnd + 1, one["streams"], (one["ttfc_us"]["p50"] or 0) / 1000,
                           (one["ttfc_us"]["p99"] or 0) / 1000, one["gap_ms"]["p99"] or 0, one["gap_ms"]["max"] or 0,
                           one["cpu_us_per_event"], one["peak_rss_kb"] / 1024, one["errors"],
                           one["loadgen_cpu_util"] or 0, one["window"]["background_cpu_util"] or 0))
            for target in TARGETS:
                results["stream"].append(pool_stream(target, conc, rounds[target]))
            add_stream_deltas(results["stream"], conc)

        time.sleep(1.0)
        results["footprint"]["after_load"] = {
            "proxy_rss_kb": status_kb(proxy.pid, "VmRSS"),
            "proxy_pss_kb": pss_kb(proxy.pid),
            "nginx_rss_kb": sum(status_kb(p, "VmRSS") for p in nginx.pids()),
            "nginx_pss_kb": sum(pss_kb(p) or 0 for p in nginx.pids()),
        }
        for p in (nginx, proxy, limited, redis, shared, mock):
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


def measure_plain(ctx, target, conc):
    owner = ctx["owners"][target]
    mock = ctx["mock"]
    if owner and owner.log_path and os.path.exists(owner.log_path):
        ctx["offsets"][target] = os.path.getsize(owner.log_path)
    target_pids = owner.pids() if owner else []
    with Window(target_pids, mock.pids()) as w:
        summary = run_wrk(ctx["ports"][target], conc, SETTINGS["plain_seconds"], ctx["plan"]["loadgen"])
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
        "window": pool_windows(rounds),
        "per_round": [
            {k: r[k] for k in ("requests", "rps", "latency_us", "errors", "non_2xx", "cpu_us_per_request", "window", "access_log_statuses", "wrk_errors")}
            for r in rounds
        ],
    }


def measure_stream(ctx, target, conc):
    owner = ctx["owners"][target]
    mock = ctx["mock"]
    target_pids = owner.pids() if owner else []
    rss_pids = target_pids or mock.pids()
    hwm_reset = reset_hwm(rss_pids)
    if owner and owner.log_path and os.path.exists(owner.log_path):
        ctx["offsets"][target] = os.path.getsize(owner.log_path)
    rss_before = sum(status_kb(p, "VmRSS") for p in rss_pids)
    with Window(target_pids, mock.pids()) as w:
        summary = run_sse(ctx["ports"][target], conc, SETTINGS["stream_seconds"], ctx["plan"]["loadgen"], rss_pids)
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


def pool_stream(target, conc, rounds):
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
    direct = find(entries, "direct", conc)
    for t in ("nginx",) + PROXIES:
        e = find(entries, t, conc)
        if e and direct:
            e["added_latency_us"] = {
                k: e["latency_us"][k] - direct["latency_us"][k] for k in ("p50", "p90", "p99")
            }


def add_stream_deltas(entries, conc):
    direct = find(entries, "direct", conc)
    for t in ("nginx",) + PROXIES:
        e = find(entries, t, conc)
        if e and direct and direct["ttfc_us"]["p50"] is not None and e["ttfc_us"]["p50"] is not None:
            e["added_ttfc_us"] = {k: round(e["ttfc_us"][k] - direct["ttfc_us"][k], 1) for k in ("p50", "p99")}
            e["added_gap_max_ms"] = round(e["gap_ms"]["max"] - direct["gap_ms"]["max"], 3)


# ------------------------------------------------------------------------------------------------
# Targets


def check_targets(r):
    targets = []

    def add(name, passed, measured, limit, ratio, note="", reliable=True):
        targets.append(
            {"target": name, "pass": bool(passed), "measured": measured, "limit": limit,
             "ratio": None if ratio is None else round(ratio, 3), "note": note, "reliable": reliable}
        )

    for conc in SETTINGS["plain_concurrency"]:
        p, n = find(r["plain"], "proxy", conc), find(r["plain"], "nginx", conc)
        if p and n and n["cpu_us_per_request"]:
            ratio = p["cpu_us_per_request"] / n["cpu_us_per_request"]
            add("CPU per plain request, c=%d: proxy <= nginx" % conc, ratio <= 1.0,
                "%.1f us" % p["cpu_us_per_request"], "nginx %.1f us" % n["cpu_us_per_request"], ratio)
    for conc in SETTINGS["stream_concurrency"]:
        p, n = find(r["stream"], "proxy", conc), find(r["stream"], "nginx", conc)
        if p and n and n["cpu_us_per_event"]:
            ratio = p["cpu_us_per_event"] / n["cpu_us_per_event"]
            add("CPU per streamed chunk, %d streams: proxy <= nginx" % conc, ratio <= 1.0,
                "%.1f us" % p["cpu_us_per_event"], "nginx %.1f us" % n["cpu_us_per_event"], ratio)
    c1 = 1 if 1 in SETTINGS["plain_concurrency"] else None
    if c1:
        p, n = find(r["plain"], "proxy", c1), find(r["plain"], "nginx", c1)
        if p and n and "added_latency_us" in p:
            pa, na = p["added_latency_us"]["p50"], n["added_latency_us"]["p50"]
            ratio = pa / na if na > 0 else None
            ok = pa <= 1.5 * na if na > 0 else pa <= 0
            add("Added latency c=1, p50: proxy <= 1.5 x nginx", ok, "%d us" % pa, "1.5 x %d us = %.0f us" % (na, 1.5 * na), ratio)
            pa99 = p["added_latency_us"]["p99"]
            d = find(r["plain"], "direct", c1)
            bg = max(e["window"]["background_cpu_util_max_round"] for e in (p, n, d))
            note = "nginx adds %d us; direct p99 %d us" % (n["added_latency_us"]["p99"], d["latency_us"]["p99"])
            # On a quiet machine the floor's p99 is well under 1 ms; far above it, or with other
            # work running, the p99s are the machine's noise and their difference means nothing.
            reliable = bg <= 0.15 and d["latency_us"]["p99"] <= 1000
            if not reliable:
                note += "; UNRELIABLE: other processes used up to %.2f cores meanwhile" % bg
            add("Added latency c=1, p99: proxy < 100 us", pa99 < 100, "%d us" % pa99, "100 us", pa99 / 100.0, note,
                reliable)
    big = max(SETTINGS["stream_concurrency"]) if SETTINGS["stream_concurrency"] else None
    p = find(r["stream"], "proxy", big) if big else None
    if p:
        n = find(r["stream"], "nginx", big)
        add("Peak RSS with %d open streams <= 40 MiB" % big, p["peak_rss_kb"] <= 40 * 1024,
            "%.1f MiB" % (p["peak_rss_kb"] / 1024), "40 MiB", p["peak_rss_kb"] / (40 * 1024),
            "nginx (master+workers, RSS sum) %.1f MiB" % (n["peak_rss_kb"] / 1024) if n else "")
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
    runs = [e for e in r["plain"] + r["stream"] if e["target"] in PROXIES]
    bad = [(e["target"], e["concurrency"], e["errors"], e["non_2xx"]) for e in runs if e["errors"] or e["non_2xx"]]
    add("Zero errors and zero non-2xx in every proxy and limited run", not bad,
        "%d errors, %d non-2xx" % (sum(e["errors"] for e in runs), sum(e["non_2xx"] for e in runs)),
        "0", None, "" if not bad else "runs (target, concurrency, errors, non-2xx): %s" % bad)
    others = [e for e in r["plain"] + r["stream"] if e["target"] not in PROXIES and (e["errors"] or e["non_2xx"])]
    if others:
        add("Zero errors in direct and nginx runs (benchmark validity)", False,
            "; ".join("%s c=%d: %d errors %d non-2xx" % (e["target"], e["concurrency"], e["errors"], e["non_2xx"]) for e in others),
            "0", None)
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
    print("Plain chat completions (wrk -t1; %d rounds of %gs per target, targets interleaved, after %gs warm-up;"
          " req/s and CPU pooled, percentiles = median of rounds)" % (SETTINGS["rounds"], SETTINGS["plain_seconds"], SETTINGS["warmup_seconds"]))
    hdr = "%-7s %5s %9s %8s %8s %9s %9s %11s %11s %6s %7s %5s" % (
        "target", "conc", "req/s", "p50 us", "p99 us", "+p50 us", "+p99 us", "cpu us/req", "mock us/req", "errors", "non2xx", "bg")
    print(hdr)
    print("-" * len(hdr))
    for e in r["plain"]:
        add = e.get("added_latency_us", {})
        print("%-7s %5d %9.0f %8d %8d %9s %9s %11s %11s %6d %7d %5.2f" % (
            e["target"], e["concurrency"], e["rps"], e["latency_us"]["p50"], e["latency_us"]["p99"],
            fmt(add.get("p50"), "%d"), fmt(add.get("p99"), "%d"), fmt(e["cpu_us_per_request"]),
            fmt(e["upstream_cpu_us_per_request"]), e["errors"], e["non_2xx"], e["window"]["background_cpu_util"] or 0))
    for conc in SETTINGS["plain_concurrency"]:
        p, l = find(r["plain"], "proxy", conc), find(r["plain"], "limited", conc)
        if p and l and p["cpu_us_per_request"] and l["cpu_us_per_request"]:
            print("client limits, c=%d: %+.1f us CPU per request (limited %.1f vs proxy %.1f, ratio %.2f)" % (
                conc, l["cpu_us_per_request"] - p["cpu_us_per_request"], l["cpu_us_per_request"],
                p["cpu_us_per_request"], l["cpu_us_per_request"] / p["cpu_us_per_request"]))
    for conc in SETTINGS["plain_concurrency"]:
        l, sh = find(r["plain"], "limited", conc), find(r["plain"], "shared", conc)
        if l and sh and l["cpu_us_per_request"] and sh["cpu_us_per_request"]:
            print("limits in Redis, c=%d: %+.1f us CPU per request, proxy and redis-server (shared %.1f vs limited %.1f),"
                  " %+d us p50, %+d us p99" % (
                      conc, sh["cpu_us_per_request"] - l["cpu_us_per_request"], sh["cpu_us_per_request"],
                      l["cpu_us_per_request"], sh["latency_us"]["p50"] - l["latency_us"]["p50"],
                      sh["latency_us"]["p99"] - l["latency_us"]["p99"]))
    print("(limited = llm-proxy with the token as a clients-file client with limits and a model list;"
          " shared = the same with REDIS_URL, the limits kept in Redis)")
    print()
    print("SSE streams (loadgen sse; %d chunks %d ms apart = %d events per stream; %d rounds of %gs of new streams per target;"
          " percentiles = median of rounds, max = max)" % (
        SETTINGS["stream_chunks"], SETTINGS["stream_interval_ms"], SETTINGS["stream_chunks"] + 3,
        SETTINGS["stream_rounds"], SETTINGS["stream_seconds"]))
    hdr = "%-7s %5s %7s %8s %9s %9s %9s %9s %8s %8s %11s %9s %6s %7s %5s %5s" % (
        "target", "conc", "streams", "events", "ttfc p50", "ttfc p99", "+ttfc p50", "+ttfc p99", "gap p99", "gap max",
        "cpu us/chk", "peak RSS", "errors", "non2xx", "gen", "bg")
    print(hdr)
    print("%-7s %5s %7s %8s %9s %9s %9s %9s %8s %8s %11s %9s" % ("", "", "", "", "ms", "ms", "ms", "ms", "ms", "ms", "", "MiB"))
    print("-" * len(hdr))
    for e in r["stream"]:
        add = e.get("added_ttfc_us", {})
        ms = lambda v: None if v is None else v / 1000.0
        print("%-7s %5d %7d %8d %9s %9s %9s %9s %8s %8s %11s %9s %6d %7d %5.2f %5.2f" % (
            e["target"], e["concurrency"], e["streams"], e["events"], fmt(ms(e["ttfc_us"]["p50"]), "%.2f"),
            fmt(ms(e["ttfc_us"]["p99"]), "%.2f"), fmt(ms(add.get("p50")), "%.2f"), fmt(ms(add.get("p99")), "%.2f"),
            fmt(e["gap_ms"]["p99"]), fmt(e["gap_ms"]["max"]), fmt(e["cpu_us_per_event"]),
            fmt(e["peak_rss_kb"] / 1024.0) + ("*" if e["rss_of"] == "upstream" else ""),
            e["errors"], e["non_2xx"], e["loadgen_cpu_util"] or 0, e["window"]["background_cpu_util"] or 0))
    print("(* direct: the upstream's own RSS. chk = SSE event forwarded. gen = load generator CPU, 1.0 = one core;"
          " bg = CPU used by other processes on the machine, in cores)")
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
        sn["first_response_ms_median"], f["nginx_binary"]["bytes"], " (+ shared libs; master + %d workers)" % f["nginx_worker_processes"]))
    if "after_load" in f:
        a = f["after_load"]
        print("after all load, idle: proxy RSS %.1f MiB (PSS %.1f), nginx RSS %.1f MiB (PSS %.1f)" % (
            a["proxy_rss_kb"] / 1024, (a["proxy_pss_kb"] or 0) / 1024, a["nginx_rss_kb"] / 1024, a["nginx_pss_kb"] / 1024))
    print()
    print("Targets")
    for t in r["targets"]:
        print("%-5s %-52s %-22s vs %-24s %s%s" % (
            ("PASS" if t["pass"] else "FAIL") + ("" if t.get("reliable", True) else "?"), t["target"], t["measured"], t["limit"],
            "ratio %.2f" % t["ratio"] if t["ratio"] is not None else "",
            ("  (%s)" % t["note"]) if t["note"] else ""))
    if any(not t.get("reliable", True) for t in r["targets"]):
        print("(PASS?/FAIL?: measured, but not reliable in this run -- see the note)")
    noisy = [e for e in r["plain"] + r["stream"] if (e["window"]["background_cpu_util"] or 0) > 0.15]
    if noisy:
        print("\nWARNING: other processes used > 0.15 core during %d run(s) (column bg): those figures are noisy." % len(noisy))


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        log("FAILED: %s" % err)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
