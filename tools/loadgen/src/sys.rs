//! The few process facts the reports need, read from the kernel directly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CPU time (user + system) of this process so far, so a run can say whether the load generator
/// itself was the bottleneck.
pub fn cpu_time() -> Duration {
    // SAFETY: an all-zero `rusage` is a valid value of that plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live, writable `rusage`, which is all getrusage writes.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
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

fn status_field_kb(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// False once the process is gone or a zombie (a dead child stays a zombie until reaped).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status
            .lines()
            .any(|line| line.starts_with("State:") && line.split_whitespace().nth(1) == Some("Z")),
        Err(_) => false,
    }
}

/// VmRSS in kB, 0 when the process is gone.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| status_field_kb(&status, "VmRSS"))
        .unwrap_or(0)
}

/// "rss N kB (anon N), fds N" for the progress lines, or "gone".
pub fn proc_brief(pid: u32) -> String {
    let brief = || -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status_field_kb(&status, "VmRSS")?;
        let anon = status_field_kb(&status, "RssAnon")?;
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
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nRssAnon:\t 56 kB\n";
        assert_eq!(status_field_kb(status, "VmRSS"), Some(1234));
        assert_eq!(status_field_kb(status, "RssAnon"), Some(56));
        assert_eq!(status_field_kb(status, "VmHWM"), None);
    }

    #[test]
    fn own_process_is_alive_and_has_cpu() {
        assert!(process_alive(std::process::id()));
        assert!(rss_kb(std::process::id()) > 0);
    }
}
