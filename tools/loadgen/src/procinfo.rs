//! `loadgen procinfo`: the readings of one process that scripts/soak.sh takes (Linux `/proc`).
//!
//! * `snapshot PID PROXY_PORT UPSTREAM_PORT`: one line of shell assignments: rss_kb (VmRSS, also
//!   split into anon_kb and file_kb), fds, threads, cpu_ticks and the breakdown of the file
//!   descriptors (listening socket, client and upstream connections, other). Sockets are told
//!   apart by matching their inodes against `/proc/PID/net/tcp{,6}`.
//! * `settle PID PROXY_PORT UPSTREAM_PORT MIN_SECONDS MAX_SECONDS`: waits at least MIN_SECONDS,
//!   then until no client connection to the proxy is left and the fd count has not changed for a
//!   second, or MAX_SECONDS in all; then prints a snapshot. Exit status 1 if it did not settle
//!   in time (the snapshot is printed all the same).
//! * `describe SNAPSHOT`: the human-readable form of a snapshot line.
//! * `cpu-ticks PID`: utime + stime of the process, in clock ticks.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::sys;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// One reading as shell assignments (key=value ...).
    Snapshot {
        pid: u32,
        proxy_port: u16,
        upstream_port: u16,
    },
    /// Waits until the proxy is quiet, then prints a reading; exit 1 if it did not settle.
    Settle {
        pid: u32,
        proxy_port: u16,
        upstream_port: u16,
        min_seconds: f64,
        max_seconds: f64,
    },
    /// The human-readable form of a snapshot line.
    Describe { snapshot: String },
    /// utime + stime of a process, in clock ticks.
    CpuTicks { pid: u32 },
}

/// Which side of the proxy a socket belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listen,
    Client,
    Upstream,
    OtherSocket,
    NonSocket,
}

#[derive(Debug, Default, PartialEq)]
struct Snapshot {
    rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    fds: u64,
    threads: u64,
    cpu_ticks: u64,
    listen: u64,
    client: u64,
    upstream: u64,
    other_socket: u64,
    non_socket: u64,
    client_states: BTreeMap<&'static str, u64>,
    upstream_states: BTreeMap<&'static str, u64>,
}

fn states_text(states: &BTreeMap<&'static str, u64>) -> String {
    if states.is_empty() {
        return "-".to_string();
    }
    let parts: Vec<String> = states.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    parts.join(",")
}

impl Snapshot {
    /// `key=value` pairs; no value holds a character the shell would need quoted.
    fn as_shell(&self) -> String {
        format!(
            "rss_kb={} anon_kb={} file_kb={} fds={} threads={} cpu_ticks={} listen={} client={} \
             upstream={} other_socket={} non_socket={} client_states={} upstream_states={}",
            self.rss_kb,
            self.anon_kb,
            self.file_kb,
            self.fds,
            self.threads,
            self.cpu_ticks,
            self.listen,
            self.client,
            self.upstream,
            self.other_socket,
            self.non_socket,
            states_text(&self.client_states),
            states_text(&self.upstream_states)
        )
    }
}

/// None once the process is gone (or a zombie: it has exited).
fn snapshot(pid: u32, proxy_port: u16, upstream_port: u16) -> Option<Snapshot> {
    let rss_kb = sys::status_kb(pid, "VmRSS")?;
    let mut snap = Snapshot {
        rss_kb,
        // VmRSS = RssAnon (heap, stacks) + RssFile (the binary's pages, faulted in as code paths
        // are first taken) + RssShmem.
        anon_kb: sys::status_kb(pid, "RssAnon").unwrap_or(0),
        file_kb: sys::status_kb(pid, "RssFile").unwrap_or(0),
        threads: sys::status_kb(pid, "Threads").unwrap_or(0),
        cpu_ticks: sys::stat(pid).ok()?.cpu_ticks,
        ..Snapshot::default()
    };
    let sockets = sys::tcp_sockets(pid);
    for target in sys::fd_targets(pid).ok()? {
        snap.fds += 1;
        let found = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .map(|inode| sockets.get(inode));
        let kind = match found {
            None => Kind::NonSocket,
            Some(None) => Kind::OtherSocket,
            Some(Some(s)) if s.state == "LISTEN" && s.local_port == proxy_port => Kind::Listen,
            Some(Some(s)) if s.local_port == proxy_port => Kind::Client,
            Some(Some(s)) if s.remote_port == upstream_port => Kind::Upstream,
            Some(Some(_)) => Kind::OtherSocket,
        };
        let (count, states) = match kind {
            Kind::Listen => (&mut snap.listen, None),
            Kind::Client => (&mut snap.client, Some(&mut snap.client_states)),
            Kind::Upstream => (&mut snap.upstream, Some(&mut snap.upstream_states)),
            Kind::OtherSocket => (&mut snap.other_socket, None),
            Kind::NonSocket => (&mut snap.non_socket, None),
        };
        *count += 1;
        if let (Some(states), Some(Some(s))) = (states, found) {
            *states.entry(s.state).or_default() += 1;
        }
    }
    Some(snap)
}

/// The human-readable form of a snapshot line, or the name of the field it lacks.
fn describe(line: &str) -> Result<String, String> {
    let fields: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let f = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| format!("snapshot has no {key}"))
    };
    Ok(format!(
        "RSS {} kB (anon {} + file {}), {} fds = {} listening + {} client [{}] + {} upstream [{}] \
         + {} other sockets + {} non-socket, {} threads",
        f("rss_kb")?,
        f("anon_kb")?,
        f("file_kb")?,
        f("fds")?,
        f("listen")?,
        f("client")?,
        f("client_states")?,
        f("upstream")?,
        f("upstream_states")?,
        f("other_socket")?,
        f("non_socket")?,
        f("threads")?
    ))
}

fn settle(
    pid: u32,
    proxy_port: u16,
    upstream_port: u16,
    min: f64,
    max: f64,
) -> Option<(Snapshot, bool)> {
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(min.max(0.0)));
    let mut last_fds = None;
    let mut stable_since = Instant::now();
    loop {
        let snap = snapshot(pid, proxy_port, upstream_port)?;
        let now = Instant::now();
        if last_fds != Some(snap.fds) {
            stable_since = now;
        }
        last_fds = Some(snap.fds);
        if snap.client == 0 && now - stable_since >= Duration::from_secs(1) {
            return Some((snap, true));
        }
        if (now - start).as_secs_f64() >= max {
            return Some((snap, false));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn gone(pid: u32) -> ExitCode {
    eprintln!("procinfo: process {pid} is gone");
    ExitCode::FAILURE
}

pub fn main(command: Command) -> ExitCode {
    match command {
        Command::Snapshot {
            pid,
            proxy_port,
            upstream_port,
        } => match snapshot(pid, proxy_port, upstream_port) {
            Some(snap) => {
                println!("{}", snap.as_shell());
                ExitCode::SUCCESS
            }
            None => gone(pid),
        },
        Command::Settle {
            pid,
            proxy_port,
            upstream_port,
            min_seconds,
            max_seconds,
        } => match settle(pid, proxy_port, upstream_port, min_seconds, max_seconds) {
            Some((snap, settled)) => {
                println!("{}", snap.as_shell());
                if settled {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            None => gone(pid),
        },
        Command::Describe { snapshot } => match describe(&snapshot) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("procinfo: {err}");
                ExitCode::from(2)
            }
        },
        Command::CpuTicks { pid } => match sys::stat(pid) {
            Ok(stat) => {
                println!("{}", stat.cpu_ticks);
                ExitCode::SUCCESS
            }
            Err(_) => gone(pid),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_line_reads_back_as_its_description() {
        let mut snap = Snapshot {
            rss_kb: 5000,
            anon_kb: 3000,
            file_kb: 2000,
            fds: 12,
            threads: 3,
            cpu_ticks: 77,
            listen: 1,
            client: 2,
            upstream: 4,
            other_socket: 0,
            non_socket: 5,
            ..Snapshot::default()
        };
        snap.client_states.insert("ESTABLISHED", 1);
        snap.client_states.insert("CLOSE_WAIT", 1);
        snap.upstream_states.insert("ESTABLISHED", 4);
        let line = snap.as_shell();
        assert!(line.contains(" client_states=CLOSE_WAIT:1,ESTABLISHED:1 "));
        assert_eq!(
            describe(&line).unwrap(),
            "RSS 5000 kB (anon 3000 + file 2000), 12 fds = 1 listening + 2 client \
             [CLOSE_WAIT:1,ESTABLISHED:1] + 4 upstream [ESTABLISHED:4] + 0 other sockets \
             + 5 non-socket, 3 threads"
        );
        assert_eq!(describe("rss_kb=1").unwrap_err(), "snapshot has no anon_kb");
    }

    #[test]
    fn own_process_has_a_snapshot() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let snap = snapshot(std::process::id(), port, 1).unwrap();
        assert_eq!(snap.listen, 1);
        assert!(snap.rss_kb > 0 && snap.fds >= 1);
        assert_eq!(states_text(&snap.client_states), "-");
    }
}
