#!/usr/bin/env python3
"""Resource readings of one process for scripts/soak.sh (Python 3 standard library, Linux /proc).

  procinfo.py snapshot PID PROXY_PORT UPSTREAM_PORT
      one line of shell assignments: rss_kb, fds, threads, cpu_ticks and the breakdown of the
      file descriptors (listening socket, client and upstream connections, other).
  procinfo.py settle PID PROXY_PORT UPSTREAM_PORT MIN_SECONDS MAX_SECONDS
      waits at least MIN_SECONDS, then until no client connection to the proxy is left and the
      fd count has not changed for a second, or MAX_SECONDS in all; then prints a snapshot.
      Exit status 1 if it did not settle in time (the snapshot is printed all the same).
  procinfo.py describe SNAPSHOT
      the human-readable form of a snapshot line.

RSS is VmRSS from /proc/PID/status (also split into RssAnon and RssFile), fds the entries of /proc/PID/fd. Sockets are told apart
by matching their inodes against /proc/PID/net/tcp{,6}.
"""

import os
import shlex
import sys
import time

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def tcp_sockets(pid):
    """inode -> (local port, remote port, state) for the process's network namespace."""
    sockets = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    sockets[fields[9]] = (local_port, remote_port, TCP_STATES.get(fields[3], fields[3]))
        except OSError:
            pass
    return sockets


def snapshot(pid, proxy_port, upstream_port):
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    if "VmRSS" not in fields:
        raise ProcessLookupError(pid)  # a zombie: it has exited
    rss_kb = int(fields["VmRSS"].split()[0])
    # VmRSS = RssAnon (heap, stacks) + RssFile (the binary's pages, faulted in as code paths are
    # first taken) + RssShmem.
    anon_kb = int(fields.get("RssAnon", "0 kB").split()[0])
    file_kb = int(fields.get("RssFile", "0 kB").split()[0])
    threads = int(fields["Threads"])
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which is in parentheses and may contain spaces.
        rest = stat.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(rest[11]) + int(rest[12])  # utime + stime

    sockets = tcp_sockets(pid)
    counts = {"listen": 0, "client": 0, "upstream": 0, "other_socket": 0, "non_socket": 0}
    states = {"client": {}, "upstream": {}}
    fds = 0
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed between listdir and readlink
        fds += 1
        if not target.startswith("socket:["):
            counts["non_socket"] += 1
            continue
        found = sockets.get(target[len("socket:[") : -1])
        if found is None:
            counts["other_socket"] += 1
            continue
        local_port, remote_port, state = found
        if state == "LISTEN" and local_port == proxy_port:
            kind = "listen"
        elif local_port == proxy_port:
            kind = "client"
        elif remote_port == upstream_port:
            kind = "upstream"
        else:
            kind = "other_socket"
        counts[kind] += 1
        if kind in states:
            states[kind][state] = states[kind].get(state, 0) + 1

    def state_text(kind):
        return ",".join(f"{s}:{n}" for s, n in sorted(states[kind].items())) or "-"

    return {
        "rss_kb": rss_kb,
        "anon_kb": anon_kb,
        "file_kb": file_kb,
        "fds": fds,
        "threads": threads,
        "cpu_ticks": cpu_ticks,
        **counts,
        "client_states": state_text("client"),
        "upstream_states": state_text("upstream"),
    }


def as_shell(snap):
    return " ".join(f"{key}={shlex.quote(str(value))}" for key, value in snap.items())


def describe(snap):
    return (
        f"RSS {snap['rss_kb']} kB (anon {snap['anon_kb']} + file {snap['file_kb']}), {snap['fds']} fds "
        f"= {snap['listen']} listening + {snap['client']} client [{snap['client_states']}] "
        f"+ {snap['upstream']} upstream [{snap['upstream_states']}] "
        f"+ {snap['other_socket']} other sockets + {snap['non_socket']} non-socket, "
        f"{snap['threads']} threads"
    )


def settle(pid, proxy_port, upstream_port, min_seconds, max_seconds):
    start = time.monotonic()
    time.sleep(min_seconds)
    last = None
    stable_since = time.monotonic()
    while True:
        snap = snapshot(pid, proxy_port, upstream_port)
        now = time.monotonic()
        if last is None or snap["fds"] != last["fds"]:
            stable_since = now
        last = snap
        if snap["client"] == 0 and now - stable_since >= 1.0:
            return snap, True
        if now - start >= max_seconds:
            return snap, False
        time.sleep(0.25)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "snapshot" and len(args) == 3:
            print(as_shell(snapshot(*map(int, args))))
        elif command == "settle" and len(args) == 5:
            pid, proxy_port, upstream_port = map(int, args[:3])
            snap, settled = settle(pid, proxy_port, upstream_port, float(args[3]), float(args[4]))
            print(as_shell(snap))
            sys.exit(0 if settled else 1)
        elif command == "describe" and len(args) == 1:
            snap = dict(item.split("=", 1) for item in shlex.split(args[0]))
            print(describe(snap))
        else:
            sys.exit(__doc__)
    except (FileNotFoundError, ProcessLookupError):
        sys.exit(f"procinfo: process {args[0]} is gone")


if __name__ == "__main__":
    main()
