//! One load run against one target: the CPU window around it, the load generator (wrk for
//! plain requests, `loadgen sse` for streams), the access log's statuses and Redis's counters.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

use super::procs::{Proc, pinned, run_captured};
use super::settings::{CLIENT_TOKEN, Paths, Settings, is_proxy, kind};
use super::stats::round3;
use super::{BenchError, check_interrupted};
use crate::sse_bench;
use crate::sys;

/// CPU of the measured processes, of the load generator (waited-for children) and of everything
/// else on the machine, over one load run.
pub struct Window {
    t0: Instant,
    target_pids: Vec<u32>,
    upstream_pids: Vec<u32>,
    target0: f64,
    up0: f64,
    sys0: sys::SystemTimes,
    gen0: f64,
    self0: f64,
}

/// What a window measured.
pub struct Measured {
    pub wall: f64,
    pub target: f64,
    pub upstream: f64,
    loadgen: f64,
    background: f64,
    irq: f64,
    steal: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct WindowOut {
    pub wall_s: f64,
    pub target_cpu_s: Option<f64>,
    pub upstream_cpu_s: f64,
    pub loadgen_cpu_s: f64,
    pub background_cpu_util: Option<f64>,
    pub softirq_cpu_util: Option<f64>,
    pub steal_cpu_util: Option<f64>,
}

fn system_times() -> Result<sys::SystemTimes, BenchError> {
    sys::system_times().map_err(|e| BenchError::Failed(format!("/proc/stat: {e}")))
}

impl Window {
    pub fn start(target_pids: Vec<u32>, upstream_pids: Vec<u32>) -> Result<Self, BenchError> {
        Ok(Window {
            t0: Instant::now(),
            target0: sys::cpu_seconds(&target_pids),
            up0: sys::cpu_seconds(&upstream_pids),
            sys0: system_times()?,
            gen0: sys::children_cpu_time().as_secs_f64(),
            self0: sys::cpu_time().as_secs_f64(),
            target_pids,
            upstream_pids,
        })
    }

    pub fn finish(self) -> Result<Measured, BenchError> {
        let wall = self.t0.elapsed().as_secs_f64();
        let target = sys::cpu_seconds(&self.target_pids) - self.target0;
        let upstream = sys::cpu_seconds(&self.upstream_pids) - self.up0;
        let loadgen = sys::children_cpu_time().as_secs_f64() - self.gen0;
        let driver = sys::cpu_time().as_secs_f64() - self.self0;
        let sys1 = system_times()?;
        let busy = sys1.process - self.sys0.process;
        Ok(Measured {
            wall,
            target,
            upstream,
            loadgen,
            // Processes outside the benchmark. Loopback TCP work done in softirq context is
            // charged to no process (not to the proxies' utime+stime either): reported apart.
            background: (busy - target - upstream - loadgen - driver).max(0.0),
            irq: sys1.irq - self.sys0.irq,
            steal: sys1.steal - self.sys0.steal,
        })
    }
}

impl Measured {
    pub fn out(&self, target_included: bool) -> WindowOut {
        let util = |v: f64| (self.wall > 0.0).then(|| round3(v / self.wall));
        WindowOut {
            wall_s: round3(self.wall),
            target_cpu_s: target_included.then(|| round3(self.target)),
            upstream_cpu_s: round3(self.upstream),
            loadgen_cpu_s: round3(self.loadgen),
            background_cpu_util: util(self.background),
            softirq_cpu_util: util(self.irq),
            steal_cpu_util: util(self.steal),
        }
    }
}

/// The summary scripts/bench/plain.lua prints.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct WrkSummary {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub errors: WrkErrors,
    pub latency_us: WrkLatency,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct WrkLatency {
    pub min: u64,
    pub mean: f64,
    pub stdev: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// The last JSON line of a tool's stdout.
fn last_json_line<T: for<'de> Deserialize<'de>>(stdout: &str, what: &str) -> Result<T, BenchError> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            let tail: String = stdout
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            BenchError::Failed(format!("{what} printed no summary: {tail}"))
        })?;
    serde_json::from_str(line).map_err(|e| BenchError::Failed(format!("{what}'s summary: {e}")))
}

fn tail(text: &str, chars: usize) -> String {
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(chars);
    text.chars().skip(skip).collect()
}

pub fn run_wrk(
    paths: &Paths,
    port: u16,
    concurrency: u32,
    seconds: f64,
    cpus: Option<&[usize]>,
) -> Result<WrkSummary, BenchError> {
    let mut cmd = pinned(&paths.wrk, cpus);
    cmd.arg("-t1")
        .arg(format!("-c{concurrency}"))
        .arg(format!("-d{}s", seconds.round_ties_even().max(1.0) as u64))
        .args(["--timeout", "5s", "-s"])
        .arg(&paths.wrk_script)
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .env("BENCH_CLIENT_TOKEN", CLIENT_TOKEN);
    let (code, out, err) = run_captured(&mut cmd, "wrk", Duration::from_secs_f64(seconds + 60.0))?;
    if code != 0 {
        return Err(BenchError::Failed(format!(
            "wrk failed ({code}): {}",
            err.trim()
        )));
    }
    last_json_line(&out, "wrk")
}

/// Seconds over which the load generator opens its connections: one, or more above 2500
/// streams so that the accept queue never overflows (a dropped SYN costs a 1 s retransmit).
fn ramp_seconds(concurrency: u32) -> f64 {
    (concurrency as f64 / 2500.0).max(1.0)
}

fn run_sse(
    settings: &Settings,
    paths: &Paths,
    port: u16,
    concurrency: u32,
    interval_ms: u64,
    cpus: Option<&[usize]>,
    rss_pids: &[u32],
) -> Result<sse_bench::Report, BenchError> {
    let seconds = settings.stream_seconds;
    let mut cmd = pinned(&paths.loadgen, cpus);
    cmd.arg("sse")
        .args(["--port", &port.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--duration", &seconds.to_string()])
        .args(["--ramp", &ramp_seconds(concurrency).to_string()])
        .args(["--chunks", &settings.stream_chunks.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()])
        .env("BENCH_CLIENT_TOKEN", CLIENT_TOKEN);
    for pid in rss_pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    let (code, out, err) = run_captured(
        &mut cmd,
        "loadgen sse",
        Duration::from_secs_f64(seconds + 120.0),
    )?;
    if code != 0 {
        return Err(BenchError::Failed(format!(
            "loadgen sse failed ({code}): {}",
            tail(&err, 2000)
        )));
    }
    last_json_line(&out, "loadgen sse")
}

static TOTAL_COMMANDS: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"total_commands_processed:(\d+)").ok());
static SCRIPT_CALLS: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"cmdstat_(?:eval|evalsha|eval_ro|evalsha_ro|fcall|fcall_ro):calls=(\d+)").ok()
});

fn number(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// (script calls, commands) in a redis-server's INFO: EVAL/EVALSHA calls, which are what
/// llm-proxy sends (one per decision or settlement, so one per round trip), and every command,
/// those the scripts run inside included (total_commands_processed).
fn parse_redis_info(info: &[u8]) -> Option<(u64, u64)> {
    let total = TOTAL_COMMANDS.as_ref()?.captures(info)?;
    let scripts = SCRIPT_CALLS
        .as_ref()?
        .captures_iter(info)
        .map(|c| number(&c[1]))
        .sum();
    Some((scripts, number(&total[1])))
}

/// (script calls, commands) the redis-server has run so far.
fn redis_commands(port: u16) -> Result<(u64, u64), BenchError> {
    let fail = |e: std::io::Error| BenchError::Failed(format!("redis-server INFO: {e}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    s.write_all(b"INFO everything\r\n").map_err(fail)?;
    // One bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).map_err(fail)?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(2).position(|w| w == b"\r\n")
            && data.starts_with(b"$")
            && data.len() >= end + 2 + number(&data[1..end]) as usize + 2
        {
            break;
        }
    }
    parse_redis_info(&data).ok_or_else(|| {
        BenchError::Failed("redis-server INFO has no total_commands_processed".into())
    })
}

static PROXY_STATUS: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r" status=(\d{3}) ").ok());
static NGINX_STATUS: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r#"" (\d{3}) "#).ok());

/// Counts of the HTTP statuses in access log lines (llm-proxy's `status=NNN`, or nginx's
/// combined format).
fn count_statuses(data: &[u8], proxy: bool) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let re = if proxy { &PROXY_STATUS } else { &NGINX_STATUS };
    if let Some(re) = re.as_ref() {
        for c in re.captures_iter(data) {
            *counts
                .entry(String::from_utf8_lossy(&c[1]).into_owned())
                .or_insert(0) += 1;
        }
    }
    counts
}

/// Statuses in an access log from byte `offset`; returns (counts, new offset).
fn access_statuses(
    path: Option<&Path>,
    target: &str,
    offset: u64,
) -> (Option<BTreeMap<String, u64>>, u64) {
    let Some(path) = path.filter(|p| p.as_os_str() != "off") else {
        return (None, offset);
    };
    let Ok(data) = std::fs::read(path) else {
        return (None, offset);
    };
    let from = (offset as usize).min(data.len());
    (
        Some(count_statuses(&data[from..], is_proxy(target))),
        data.len() as u64,
    )
}

fn log_size(owner: Option<&Proc>) -> Option<u64> {
    let path: &PathBuf = owner?.log_path.as_ref()?;
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// What a run needs of its target.
pub struct Ctx<'a> {
    pub settings: &'a Settings,
    pub paths: &'a Paths,
    pub loadgen_cpus: Option<&'a [usize]>,
    pub port: u16,
    pub owner: Option<&'a Proc>,
    pub upstream: &'a Proc,
    pub redis: Option<&'a Proc>,
    /// Where the owner's access log had got to.
    pub offset: &'a mut u64,
}

fn non_2xx_in(statuses: &BTreeMap<String, u64>, skip: &[&str]) -> u64 {
    statuses
        .iter()
        .filter(|(k, _)| !k.starts_with('2') && !skip.contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum()
}

#[derive(Serialize, Debug, Clone)]
pub struct PlainRound {
    pub requests: u64,
    pub rps: f64,
    pub latency_us: WrkLatency,
    pub errors: u64,
    pub non_2xx: u64,
    pub cpu_us_per_request: Option<f64>,
    pub window: WindowOut,
    pub access_log_statuses: Option<BTreeMap<String, u64>>,
    pub wrk_errors: WrkErrors,
    pub redis_scripts: Option<u64>,
    pub redis_commands: Option<u64>,
    #[serde(skip)]
    pub duration_s: f64,
    #[serde(skip)]
    pub target_cpu_s: f64,
    #[serde(skip)]
    pub upstream_cpu_s: f64,
}

pub fn measure_plain(
    ctx: &mut Ctx,
    target: &str,
    concurrency: u32,
) -> Result<PlainRound, BenchError> {
    check_interrupted()?;
    if let Some(size) = log_size(ctx.owner) {
        *ctx.offset = size;
    }
    let target_pids = ctx.owner.map(Proc::pids).unwrap_or_default();
    let redis = if kind(target) == "shared" {
        ctx.redis
    } else {
        None
    };
    let commands0 = redis.map(|r| redis_commands(r.port)).transpose()?;
    let window = Window::start(target_pids, ctx.upstream.pids())?;
    let summary = run_wrk(
        ctx.paths,
        ctx.port,
        concurrency,
        ctx.settings.plain_seconds,
        ctx.loadgen_cpus,
    )?;
    let w = window.finish()?;
    let (scripts, commands) = match (redis, commands0) {
        (Some(r), Some((s0, c0))) => {
            let (s1, c1) = redis_commands(r.port)?;
            // Less one: the first INFO itself, counted once it has run.
            (Some(s1 - s0), Some(c1.saturating_sub(c0 + 1)))
        }
        _ => (None, None),
    };
    let mut statuses = None;
    if let Some(owner) = ctx.owner {
        std::thread::sleep(Duration::from_millis(100)); // let the last access lines reach the log
        let (found, end) = access_statuses(owner.log_path.as_deref(), target, *ctx.offset);
        statuses = found;
        *ctx.offset = end;
    }
    let reqs = summary.requests;
    let e = &summary.errors;
    let mut non_2xx = e.status; // wrk counts status >= 400
    if let Some(statuses) = &statuses {
        // 499 is the load generator hanging up on requests still in flight when its run ends
        // (wrk closes every connection at once): the client's doing, not an answer.
        non_2xx = non_2xx.max(non_2xx_in(statuses, &["499"]));
    }
    let duration_s = summary.duration_us as f64 / 1e6;
    Ok(PlainRound {
        requests: reqs,
        duration_s,
        rps: if duration_s > 0.0 {
            (reqs as f64 / duration_s * 10.0).round() / 10.0
        } else {
            0.0
        },
        errors: e.connect + e.read + e.write + e.timeout,
        non_2xx,
        cpu_us_per_request: (ctx.owner.is_some() && reqs > 0)
            .then(|| super::stats::round_to(w.target / reqs as f64 * 1e6, 2)),
        window: w.out(ctx.owner.is_some()),
        access_log_statuses: statuses,
        wrk_errors: summary.errors.clone(),
        latency_us: summary.latency_us,
        redis_scripts: scripts,
        redis_commands: commands,
        target_cpu_s: w.target,
        upstream_cpu_s: w.upstream,
    })
}

#[derive(Serialize, Debug, Clone)]
pub struct StreamRound {
    pub streams: u64,
    pub events: u64,
    pub ttfc_us: sse_bench::Ttfc,
    pub gap_ms: sse_bench::Gaps,
    pub errors: u64,
    pub non_2xx: u64,
    pub cpu_us_per_event: Option<f64>,
    pub peak_rss_kb: u64,
    pub vmhwm_sum_kb: Option<u64>,
    pub peak_rss_sampled_kb: Option<u64>,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    pub loadgen_cpu_util: Option<f64>,
    pub window: WindowOut,
    pub access_log_statuses: Option<BTreeMap<String, u64>>,
    pub error_kinds: BTreeMap<String, u64>,
    #[serde(skip)]
    pub target_cpu_s: f64,
    #[serde(skip)]
    pub upstream_cpu_s: f64,
}

pub fn measure_stream(
    ctx: &mut Ctx,
    target: &str,
    concurrency: u32,
    interval_ms: u64,
) -> Result<StreamRound, BenchError> {
    check_interrupted()?;
    let target_pids = ctx.owner.map(Proc::pids).unwrap_or_default();
    let rss_pids = if target_pids.is_empty() {
        ctx.upstream.pids()
    } else {
        target_pids.clone()
    };
    let hwm_reset = sys::reset_hwm(&rss_pids);
    if let Some(size) = log_size(ctx.owner) {
        *ctx.offset = size;
    }
    let rss_sum = |pids: &[u32]| pids.iter().map(|&p| sys::rss_kb(p)).sum::<u64>();
    let rss_before = rss_sum(&rss_pids);
    let window = Window::start(target_pids, ctx.upstream.pids())?;
    let summary = run_sse(
        ctx.settings,
        ctx.paths,
        ctx.port,
        concurrency,
        interval_ms,
        ctx.loadgen_cpus,
        &rss_pids,
    )?;
    let w = window.finish()?;
    let hwm = hwm_reset.then(|| {
        rss_pids
            .iter()
            .filter_map(|&p| sys::status_kb(p, "VmHWM"))
            .sum::<u64>()
    });
    let rss_after = rss_sum(&rss_pids);
    let mut statuses = None;
    if let Some(owner) = ctx.owner {
        std::thread::sleep(Duration::from_millis(100));
        let (found, end) = access_statuses(owner.log_path.as_deref(), target, *ctx.offset);
        statuses = found;
        *ctx.offset = end;
    }
    let events = summary.events_all;
    let mut non_2xx = summary.non_2xx;
    if let Some(statuses) = &statuses {
        non_2xx = non_2xx.max(non_2xx_in(statuses, &[]));
    }
    Ok(StreamRound {
        streams: summary.streams_ok,
        events,
        ttfc_us: summary.ttfc_us,
        gap_ms: summary.gap_ms,
        errors: summary.errors,
        non_2xx,
        cpu_us_per_event: (ctx.owner.is_some() && events > 0)
            .then(|| super::stats::round_to(w.target / events as f64 * 1e6, 2)),
        peak_rss_kb: summary
            .peak_rss_sampled_kb
            .unwrap_or(0)
            .max(hwm.unwrap_or(0)),
        vmhwm_sum_kb: hwm,
        peak_rss_sampled_kb: summary.peak_rss_sampled_kb,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        loadgen_cpu_util: summary.loadgen_cpu_util,
        window: w.out(ctx.owner.is_some()),
        access_log_statuses: statuses,
        error_kinds: summary.error_kinds,
        target_cpu_s: w.target,
        upstream_cpu_s: w.upstream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_counted_by_status() {
        let proxy = b"2025-01-01T00:00:00Z INFO POST /v1/chat/completions status=200 duration_ms=1\n\
                      2025-01-01T00:00:00Z INFO POST /v1/chat/completions status=200 duration_ms=1\n\
                      2025-01-01T00:00:00Z INFO POST /v1/chat/completions status=499 duration_ms=1\n";
        let counts = count_statuses(proxy, true);
        assert_eq!(counts.get("200"), Some(&2));
        assert_eq!(non_2xx_in(&counts, &["499"]), 0);
        assert_eq!(non_2xx_in(&counts, &[]), 1);
        let nginx = b"127.0.0.1 - - [01/Jan/2025:00:00:00 +0000] \"POST /v1/chat/completions HTTP/1.1\" 401 52 \"-\" \"wrk\"\n";
        assert_eq!(count_statuses(nginx, false).get("401"), Some(&1));
    }

    #[test]
    fn redis_info_gives_script_calls_and_commands() {
        let info = b"$200\r\n# Stats\r\ntotal_commands_processed:1234\r\n# Commandstats\r\n\
                     cmdstat_evalsha:calls=100,usec=5\r\ncmdstat_eval:calls=2,usec=1\r\n\
                     cmdstat_hget:calls=50,usec=1\r\n";
        assert_eq!(parse_redis_info(info), Some((102, 1234)));
        assert_eq!(parse_redis_info(b"$0\r\n\r\n"), None);
    }

    #[test]
    fn the_wrk_summary_line_is_read() {
        let out = "Running 1s test\n{\"requests\":10,\"duration_us\":1000000,\"bytes\":99,\
                   \"errors\":{\"connect\":0,\"read\":0,\"write\":0,\"status\":1,\"timeout\":0},\
                   \"latency_us\":{\"min\":1,\"mean\":2.50,\"stdev\":0.10,\"p50\":2,\"p90\":3,\"p99\":4,\"p999\":5,\"max\":6}}\n";
        let s: WrkSummary = last_json_line(out, "wrk").unwrap();
        assert_eq!((s.requests, s.errors.status, s.latency_us.p99), (10, 1, 4));
        assert!(last_json_line::<WrkSummary>("no json", "wrk").is_err());
        assert_eq!(ramp_seconds(200), 1.0);
        assert_eq!(ramp_seconds(5000), 2.0);
    }
}
