//! The process facts the tools need, read from the kernel directly: the one place that reads
//! `/proc` (RSS, PSS, CPU time, threads, children, open files and their sockets, machine-wide
//! CPU) and the one free-port helper. Parsing is split from reading so it can be tested on
//! sample text.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CPU time (user + system) of this process so far, so a run can say whether the load generator
/// itself was the bottleneck.
pub fn cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of the children this process has waited for: the bench's load generators.
pub fn children_cpu_time() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero `rusage` is a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable `rusage`, which is all getrusage writes.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The soft open-files limit.
pub fn nofile() -> u64 {
    // SAFETY: an all-zero `rlimit` is a valid value of that plain C struct.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur as u64
}

/// Raises the soft open-files limit to `want` (capped at the hard limit), or to the hard limit
/// when `want` is None; never lowers it. Failure is not fatal: the run then reports connect errors.
pub fn raise_nofile(want: Option<u64>) {
    // SAFETY: an all-zero `rlimit` is a valid value of that plain C struct.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let target = want.map_or(limit.rlim_max, |w| (w as libc::rlim_t).min(limit.rlim_max));
    if target > limit.rlim_cur {
        limit.rlim_cur = target;
        // SAFETY: the pointer is to a live `rlimit` that setrlimit only reads.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the race for it is harmless on loopback).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero `cpu_set_t` is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size are those of a live, writable `cpu_set_t`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Gives this process's autogroup (its session) the nice value `nice`.
pub fn set_autogroup_nice(nice: i32) -> io::Result<()> {
    std::fs::write("/proc/self/autogroup", nice.to_string())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Clock ticks per second, the unit of the CPU times in `/proc`.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads its argument.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn read(pid: u32, file: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
}

/// What the tools use of `/proc/PID/stat`.
#[derive(Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    /// utime + stime, all threads (dead ones included), in clock ticks.
    pub cpu_ticks: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name is in parentheses and may hold spaces or parentheses of its own.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is the state (field 3 of proc(5)); ppid is field 4, utime 14, stime 15.
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        cpu_ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
    })
}

pub fn stat(pid: u32) -> io::Result<Stat> {
    parse_stat(&read(pid, "stat")?).ok_or_else(|| io::Error::other("unreadable /proc stat"))
}

/// CPU seconds (user + system) of these processes together; a process that is gone counts 0.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|&p| stat(p).ok())
        .map(|s| s.cpu_ticks)
        .sum();
    ticks as f64 / clk_tck()
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// A numeric field of `/proc/PID/status` (VmRSS, VmHWM, RssAnon, Threads, ...); kB for sizes.
pub fn status_kb(pid: u32, name: &str) -> Option<u64> {
    status_field(&read(pid, "status").ok()?, name)
}

/// False once the process is gone or a zombie (a dead child stays a zombie until reaped).
pub fn process_alive(pid: u32) -> bool {
    match read(pid, "status") {
        Ok(status) => !status
            .lines()
            .any(|line| line.starts_with("State:") && line.split_whitespace().nth(1) == Some("Z")),
        Err(_) => false,
    }
}

/// VmRSS in kB, 0 when the process is gone.
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS").unwrap_or(0)
}

/// Proportional set size in kB (shared pages divided among their users), from smaps_rollup.
pub fn pss_kb(pid: u32) -> Option<u64> {
    status_field(&read(pid, "smaps_rollup").ok()?, "Pss")
}

/// Resets the peak RSS (VmHWM) of these processes to their current RSS; false if any refused.
pub fn reset_hwm(pids: &[u32]) -> bool {
    pids.iter()
        .all(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok())
}

/// The processes whose parent is `pid` (nginx's workers), in pid order.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut kids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat(p).is_ok_and(|s| s.ppid == pid))
        .collect();
    kids.sort_unstable();
    kids
}

/// The names of a process's threads (`tokio-runtime-w` for tokio's workers).
pub fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Machine-wide CPU seconds since boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SystemTimes {
    /// user + nice + system: time charged to processes.
    pub process: f64,
    /// irq + softirq: charged to no process (loopback TCP work lands here).
    pub irq: f64,
    pub steal: f64,
}

fn parse_system_times(text: &str, tck: f64) -> Option<SystemTimes> {
    let mut vals: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    vals.resize(vals.len().max(8), 0);
    Some(SystemTimes {
        process: (vals[0] + vals[1] + vals[2]) as f64 / tck,
        irq: (vals[5] + vals[6]) as f64 / tck,
        steal: vals[7] as f64 / tck,
    })
}

pub fn system_times() -> io::Result<SystemTimes> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_system_times(&text, clk_tck()).ok_or_else(|| io::Error::other("unreadable /proc/stat"))
}

/// One row of `/proc/PID/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: &'static str,
}

fn tcp_state(code: &str) -> &'static str {
    match code {
        "01" => "ESTABLISHED",
        "02" => "SYN_SENT",
        "03" => "SYN_RECV",
        "04" => "FIN_WAIT1",
        "05" => "FIN_WAIT2",
        "06" => "TIME_WAIT",
        "07" => "CLOSE",
        "08" => "CLOSE_WAIT",
        "09" => "LAST_ACK",
        "0A" => "LISTEN",
        "0B" => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// inode -> socket, for a `/proc/PID/net/tcp` table (header line first).
fn parse_tcp_table(text: &str, into: &mut HashMap<String, TcpSocket>) {
    let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state), Some(inode)) = (
            fields.get(1).and_then(|a| port(a)),
            fields.get(2).and_then(|a| port(a)),
            fields.get(3),
            fields.get(9),
        ) else {
            continue;
        };
        into.insert(
            inode.to_string(),
            TcpSocket {
                local_port: local,
                remote_port: remote,
                state: tcp_state(state),
            },
        );
    }
}

/// inode -> TCP socket, over the process's network namespace (IPv4 and IPv6).
pub fn tcp_sockets(pid: u32) -> HashMap<String, TcpSocket> {
    let mut sockets = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = read(pid, table) {
            parse_tcp_table(&text, &mut sockets);
        }
    }
    sockets
}

/// What each open file descriptor of the process points at (`socket:[INODE]`, a path, ...);
/// an fd closed while the list is read is left out.
pub fn fd_targets(pid: u32) -> io::Result<Vec<String>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect())
}

/// "rss N kB (anon N), fds N" for the progress lines, or "gone".
pub fn proc_brief(pid: u32) -> String {
    let brief = || -> Option<String> {
        let status = read(pid, "status").ok()?;
        let rss = status_field(&status, "VmRSS")?;
        let anon = status_field(&status, "RssAnon")?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(format!("rss {rss} kB (anon {anon}), fds {fds}"))
    };
    brief().unwrap_or_else(|| "gone".to_string())
}

/// `HH:MM:SS.mmmZ` (UTC), the form the proxy's log uses, so a lost request can be found in it.
pub fn utc_time_of_day(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let day_secs = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_of_day_is_utc_with_millis() {
        let at = UNIX_EPOCH + Duration::from_millis(86_400_000 * 3 + 3_723_045);
        assert_eq!(utc_time_of_day(at), "01:02:03.045Z");
    }

    #[test]
    fn status_fields_parse() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nRssAnon:\t 56 kB\nThreads:\t3\n";
        assert_eq!(status_field(status, "VmRSS"), Some(1234));
        assert_eq!(status_field(status, "RssAnon"), Some(56));
        assert_eq!(status_field(status, "Threads"), Some(3));
        assert_eq!(status_field(status, "VmHWM"), None);
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  900 kB\nPss:  412 kB\nPss_Anon: 300 kB\n";
        assert_eq!(status_field(rollup, "Pss"), Some(412));
    }

    #[test]
    fn stat_survives_a_command_name_with_spaces_and_parentheses() {
        let text = "4242 (tokio (w) 1) S 17 4242 4242 0 -1 4194560 520 0 0 0 31 9 0 0 20 0 3 0 \
                    1234 10000000 500 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                ppid: 17,
                cpu_ticks: 40
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1"), None);
    }

    #[test]
    fn system_times_split_process_irq_and_steal() {
        let text = "cpu  100 20 30 4000 50 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let t = parse_system_times(text, 100.0).unwrap();
        assert_eq!(
            t,
            SystemTimes {
                process: 1.5,
                irq: 0.13,
                steal: 0.08
            }
        );
    }

    #[test]
    fn tcp_table_maps_inodes_to_ports_and_states() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5501 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5502 1 0 20 4 30 10 -1\n";
        let mut sockets = HashMap::new();
        parse_tcp_table(text, &mut sockets);
        assert_eq!(sockets.len(), 2);
        assert_eq!(
            sockets["5501"],
            TcpSocket {
                local_port: 8080,
                remote_port: 0,
                state: "LISTEN"
            }
        );
        assert_eq!(sockets["5502"].remote_port, 0xD431);
        assert_eq!(sockets["5502"].state, "ESTABLISHED");
    }

    #[test]
    fn own_process_is_alive_and_measurable() {
        let me = std::process::id();
        assert!(process_alive(me));
        assert!(rss_kb(me) > 0);
        assert!(pss_kb(me).is_some_and(|p| p > 0));
        assert!(stat(me).is_ok_and(|s| s.ppid > 0));
        assert!(!thread_names(me).is_empty());
        assert!(fd_targets(me).is_ok_and(|fds| !fds.is_empty()));
    }

    #[test]
    fn free_port_can_be_bound() {
        let port = free_port().unwrap();
        assert!(port > 0);
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }
}
