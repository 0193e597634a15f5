//! `loadgen bench`: the benchmark behind scripts/bench.sh: direct vs nginx vs llm-proxy, on
//! loopback.
//!
//! Targets (every llm-proxy instance is the same release binary with AUTH_VALIDATION=true,
//! WORKER_THREADS=BENCH_WORKERS and MAX_CONCURRENT_REQUESTS raised above the largest stream
//! count; each differs from "proxy" in one thing, so a row next to "proxy" in the same run is
//! what that one thing costs):
//!   direct     -- load straight at the mock upstream (--no-record): the floor;
//!   nginx      -- nginx as the equivalent proxy (scripts/bench/nginx.conf.template);
//!   proxy      -- the token in ALLOWED_TOKENS, LOG_LEVEL=info (one access line per request, to
//!                 a file);
//!   proxy-h2   -- "proxy" in front of a second mock in its TLS mode (--tls-self-signed; trusted
//!                 with UPSTREAM_CA_FILE), which offers h2 by ALPN, as real providers do: every
//!                 stream rides one HTTP/2 connection. Its upstream differs from direct's, so no
//!                 added latency is computed for it, and its CPU includes the TLS that nginx's
//!                 plain upstream does not;
//!   quiet      -- "proxy" with LOG_LEVEL=error: no access line (proxy vs quiet = the access line);
//!   routed     -- "proxy" with UPSTREAMS_FILE instead of TARGET_HOST/AUTH_BEARER: 3 upstreams
//!                 (each the same mock under its own name, pool and breaker, keys from a
//!                 keys_file), 30 model patterns, 10 aliases; the benchmark's model is served by
//!                 two upstreams of tier 0 weighted 3:1 (and one of tier 1), so every request is
//!                 read for its model and goes through the weighted choice. Issue 19 asks for
//!                 at most 3% more CPU per request than "proxy", and CPU per chunk unchanged;
//!   limited    -- the token as a clients-file client (CLIENTS_FILE) with every limit set, none
//!                 reached, and a model list: the body read for the model, the charge before the
//!                 call and the settlement from `usage` after it;
//!   priced     -- "limited" with dollar budgets (usd_per_day, usd_per_month) and PRICES_FILE
//!                 pricing the benchmark's model: a reservation before the call and the cost of
//!                 the usage after it. Issue 20 asks for at most 2% more CPU per request than
//!                 "limited";
//!   shared     -- "limited" with REDIS_URL: its limits in a redis-server started for the run
//!                 (one script call per decision and per settlement; the redis-server's CPU is
//!                 counted with the proxy's, since a deployment pays for both; the script calls
//!                 per request are counted from the server's INFO);
//!   clients1   -- the token as a clients-file client without limits, alone in the file;
//!   clients10k -- the same client among BENCH_CLIENTS - 1 others with random tokens: cost flat
//!                 in the number of clients means clients10k = clients1.
//!   base:X     -- with BENCH_BASE_BIN, a twin of each llm-proxy target X of BENCH_BASE_TARGETS
//!                 (default proxy, quiet, limited, clients1, clients10k, proxy-h2: what the
//!                 commit before issue 17's refactor can run), started from that older binary
//!                 with X's environment and files and run right next to X in every round, first
//!                 in turns, in every phase X is in. "Against the base binary" gives X over its
//!                 twin, the median of the rounds' ratios and their range: CPU per request, CPU
//!                 per chunk and peak RSS; and idle RSS and start-up of fresh instances (try i
//!                 of one against try i of the other). INFO only: no target is set for them.
//!
//! Started by scripts/bench.sh once nginx, wrk and the release binaries are in place; it can be
//! run on its own with the same environment.
//!
//! Phases, each target measured back to back in the same run:
//!   1. footprint: stripped binary size; start-up time (spawn -> first accepted TCP connection,
//!      and -> first HTTP response, a 401 that needs no upstream) and idle RSS/PSS of fresh
//!      instances;
//!   2. plain chat completions with wrk at each BENCH_PLAIN_CONCURRENCY (1 and 32), for
//!      BENCH_PLAIN_TARGETS (default: all but proxy-h2): req/s, latency p50/p99, added latency
//!      versus direct, CPU time per request of the target;
//!   3. SSE streams with `loadgen sse` at each BENCH_STREAM_CONCURRENCY (200 and 1000), 20 chunks
//!      50 ms apart, for BENCH_STREAM_TARGETS (default direct, nginx, proxy, routed,
//!      proxy-h2): time to first chunk, gaps between chunks, CPU time per forwarded chunk, peak RSS, errors;
//!   4. many streams: the same at each BENCH_MANY_STREAMS (5000), for BENCH_MANY_TARGETS (direct,
//!      nginx, proxy, proxy-h2), with chunks BENCH_MANY_INTERVAL_MS (250 ms) apart, so that 5000 streams make
//!      about as many events a second as 1000 streams 50 ms apart: CPU per chunk stays
//!      comparable and the peak RSS grows with the open streams alone. KB per open stream =
//!      (peak RSS at 5000 - peak RSS at 1000) / 4000, and (peak RSS at 5000 - idle RSS of a
//!      fresh instance) / 5000. Connections open over max(1 s, streams / 2500 s).
//!
//! Then it summarises how the cost grows (200 -> 1000 -> 5000 streams: CPU per chunk and peak
//! RSS; 1 -> 10,000 clients: CPU per request), checks the targets of issue 13 (ratios against
//! nginx, and each feature against the row it adds to, measured in the same run; figures the
//! issue asks to be reported are INFO lines), prints a table to stdout and writes everything to
//! BENCH_OUT (default target/bench/results.json).
//!
//! A feature's CPU against the row it adds to (routed and limited vs proxy, proxy vs quiet,
//! clients10k vs clients1; per chunk, routed vs proxy) is the median over rounds of the ratio
//! within a round, where the two ran back to back or one row apart (the rows compared stay
//! together while the order rotates, in either direction): on a
//! shared VM, CPU per request at c=32 drifts by 10% and more between rounds with nothing else
//! running, and that drift mostly cancels within a pair. The other figures are pooled over the
//! rounds (CPU, counts) or the median of the rounds (percentiles).
//!
//! Time: with the defaults about 7 minutes of measurement on a 2-core machine: plain 9 targets
//! x 2 concurrencies x (1 s warm-up + 4 rounds of 2 s), about 185 s; streams 5 targets x 2
//! concurrencies x 2 rounds of 6 s of new streams (+1 s for the last ones to end), about 150 s;
//! 5000 streams 4 targets x 1 round (each about 12 s), about 50 s; footprint and start-ups,
//! 10 s. The limited and shared targets are measured in the plain phase only (their cost is per
//! request), routed in the plain and 200/1000-stream phases, and proxy-h2 in the stream phases
//! only (memory and CPU per chunk through an HTTP/2 upstream); BENCH_*_TARGETS put them back.
//!
//! Exit status: 0 when the benchmark ran, whatever the targets say; 1 when it could not run (a
//! process did not start, a load generator failed, ...); 130 when interrupted.
//!
//! CPU pinning (BENCH_PIN, default "split") -- only 2 cores, so a compromise:
//!   * "split": the load generator alone on CPU 0; the system under test (the mock upstreams,
//!     the redis-server and the proxy being measured, nginx or llm-proxy) on CPU 1. The load
//!     generator then never competes with what it measures, and every target -- direct
//!     included -- gets the same single core to share with the upstream, so req/s at
//!     concurrency 32 is "one core's worth of upstream + proxy" and CPU-per-request is not
//!     muddied by idle cores spinning. Worker counts: each side keeps the deployment default of
//!     2 (WORKER_THREADS=2 for llm-proxy, which would otherwise size its runtime from the 1-CPU
//!     affinity mask; `worker_processes 2` for nginx), so the multi-worker overhead (tokio's
//!     work stealing and parking, nginx's accept wake-ups) is still paid, but without
//!     cross-core wake-ups; the upstream is left at its own default (1 worker on 1 CPU).
//!     Caveats: two workers time-share one core, so a stall in one worker shows up as latency;
//!     on a real 2-core box the proxy would also pay inter-processor wake-ups (see "none"). At
//!     1000 streams (~21k events/s, and about as many at 5000) the upstream and the proxy
//!     together need about a core, so CPU 1 is at or near saturation: time to first chunk and
//!     gaps there include queueing for that core (CPU per chunk and RSS do not). The load
//!     generator's own core should not be saturated (column gen); whatever its single-threaded
//!     runtime adds to the times is in the "direct" floor too.
//!   * "none": no pinning; everything floats over both cores (closest to an operator's box,
//!     noisier: the load generator and the upstream take CPU from the proxy, differently for
//!     each target).
//!
//! BENCH_WORKERS overrides the worker count of both proxies (nginx worker_processes and
//! WORKER_THREADS); unset, it is 2.
//!
//! The machine may be shared (other builds running): each run records the CPU time that
//! processes outside the benchmark used meanwhile ("background_cpu_util"); when it is high, the
//! run is noisy, the table says so (column bg), and a target whose rows had a round above 0.15
//! core is marked PASS?/FAIL?/INFO?.

mod measure;
mod procs;
mod report;
mod settings;
mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use measure::{Ctx, PlainRound, StreamRound, measure_plain, measure_stream, run_wrk};
use procs::{Plan, Procs, ProxyEnv, Startup};
use report::{Check, Figures, FootprintView, Growth, Header, PlainRow, StreamRow};
use settings::{Paths, Settings, is_base, is_executable, is_h2, is_proxy, kind};

pub use procs::{DOLLAR_BUDGETS, LIMITS, PRICES, write_upstreams_file};

#[derive(Debug)]
pub enum BenchError {
    Failed(String),
    Interrupted,
}

/// Set by SIGINT or SIGTERM: the run stops at the next check and stops its processes.
static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

pub fn check_interrupted() -> Result<(), BenchError> {
    match STOP.get() {
        Some(flag) if flag.load(Ordering::Relaxed) => Err(BenchError::Interrupted),
        _ => Ok(()),
    }
}

fn sleep(seconds: f64) -> Result<(), BenchError> {
    std::thread::sleep(Duration::from_secs_f64(seconds));
    check_interrupted()
}

static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn log(msg: &str) {
    let elapsed = T0.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {elapsed:6.1}s] {msg}");
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The repository (scripts/bench's nginx template and wrk script; target/ for the binaries).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))]
    root: PathBuf,
}

/// Own session, hence own autogroup, at a higher weight than the rest of the machine.
///
/// On a shared machine (other sessions building) an equal share of the CPU makes every figure
/// noisy. The kernel groups tasks by session ("autogroup") and shares CPU between groups, so a
/// plain `nice` would only reorder our own processes; the weight of our own group is what
/// counts. Everything started from here inherits it, load generators and servers alike, so no
/// target is favoured over another. BENCH_NICE=0 leaves priorities alone.
fn boost_priority(nice: i32) -> String {
    if nice == 0 {
        return "unchanged".into();
    }
    // SAFETY: setsid has no preconditions; it fails harmlessly if we already lead a group.
    unsafe { libc::setsid() };
    if crate::sys::set_autogroup_nice(nice).is_ok() {
        return format!("autogroup nice {nice}");
    }
    // SAFETY: setpriority on our own process, with a value the kernel range-checks.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        return format!("nice {nice}");
    }
    format!("unchanged ({})", std::io::Error::last_os_error())
}

/// True when the ELF file has no .symtab section; None when it is not a 64-bit ELF file.
fn elf_is_stripped(data: &[u8]) -> Option<bool> {
    if data.get(..4)? != b"\x7fELF" || *data.get(4)? != 2 {
        return None;
    }
    let little = *data.get(5)? == 1;
    let uint = |at: usize, len: usize| -> Option<u64> {
        let bytes = data.get(at..at + len)?;
        Some(if little {
            bytes.iter().rev().fold(0, |n, &b| n << 8 | b as u64)
        } else {
            bytes.iter().fold(0, |n, &b| n << 8 | b as u64)
        })
    };
    let shoff = uint(0x28, 8)? as usize;
    let shentsize = uint(0x3A, 2)? as usize;
    let shnum = uint(0x3C, 2)? as usize;
    const SHT_SYMTAB: u64 = 2;
    for i in 0..shnum {
        if uint(shoff + i * shentsize + 4, 4)? == SHT_SYMTAB {
            return Some(false);
        }
    }
    Some(true)
}

#[derive(Serialize)]
struct Meta {
    started_utc: String,
    host: String,
    kernel: String,
    cpus: usize,
    pinning: Plan,
    priority: String,
    workers: u32,
    settings: Settings,
    proxy_env: BTreeMap<String, String>,
    proxy_extra_env: String,
    proxy_log: String,
    nginx_access_log: String,
    versions: BTreeMap<String, serde_json::Value>,
    elapsed_s: f64,
}

#[derive(Serialize)]
struct Binary {
    path: String,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    stripped: Option<Option<bool>>,
}

#[derive(Serialize)]
struct ThreadsAtStart {
    total: usize,
    tokio_workers: usize,
}

#[derive(Serialize, Default)]
struct AfterLoad {
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_rss_kb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_pss_kb: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nginx_rss_kb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nginx_pss_kb: Option<u64>,
}

#[derive(Serialize)]
struct Footprint {
    proxy_binary: Binary,
    nginx_binary: Binary,
    startup_proxy: Startup,
    startup_nginx: Startup,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_threads_at_start: Option<ThreadsAtStart>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nginx_worker_processes: Option<usize>,
    after_load: AfterLoad,
}

#[derive(Serialize)]
struct Results {
    meta: Meta,
    footprint: Footprint,
    plain: Vec<PlainRow>,
    stream: Vec<StreamRow>,
    growth: Growth,
    targets: Vec<Check>,
    #[serde(skip_serializing_if = "Option::is_none")]
    against_base: Option<report::AgainstBase>,
}

fn versions(paths: &Paths) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    let output = |cmd: &mut Command| cmd.output().ok();
    out.insert("loadgen".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(o) = output(Command::new(&paths.nginx).arg("-v")) {
        out.insert(
            "nginx".into(),
            String::from_utf8_lossy(&o.stderr).trim().into(),
        );
    }
    if let Some(o) = output(Command::new(&paths.wrk).arg("-v"))
        && let Some(first) = String::from_utf8_lossy(&o.stdout).lines().next()
    {
        out.insert("wrk".into(), first.into());
    }
    if let Ok(mtime) = std::fs::metadata(&paths.proxy).and_then(|m| m.modified()) {
        out.insert(
            "proxy_binary_mtime_utc".into(),
            humantime::format_rfc3339_seconds(mtime).to_string().into(),
        );
    }
    let git = |args: &[&str]| output(Command::new("git").arg("-C").arg(&paths.root).args(args));
    if let Some(head) = git(&["rev-parse", "--short", "HEAD"]) {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        out.insert(
            "git_head".into(),
            if head.is_empty() {
                serde_json::Value::Null
            } else {
                head.into()
            },
        );
        if let Some(dirty) = git(&[
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ]) {
            out.insert(
                "src_dirty".into(),
                (!String::from_utf8_lossy(&dirty.stdout).trim().is_empty()).into(),
            );
        }
    }
    out
}

fn relative(path: &Path, root: &Path) -> String {
    let (Ok(path), Ok(root)) = (path.canonicalize(), root.canonicalize()) else {
        return path.display().to_string();
    };
    path.strip_prefix(&root)
        .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}

fn make_workdir() -> Result<PathBuf, BenchError> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        std::env::temp_dir().join(format!("llm-proxy-bench.{}-{nanos:09}", std::process::id()));
    std::fs::create_dir(&dir)
        .and_then(|_| std::fs::create_dir(dir.join("proxy-cwd")))
        .map_err(|e| BenchError::Failed(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Removes the work dir when the run ends, however it ends (unless BENCH_KEEP_WORKDIR).
struct Workdir {
    path: PathBuf,
    keep: bool,
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if self.keep {
            log(&format!("work dir kept: {}", self.path.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn run(args: &Args) -> Result<(), BenchError> {
    let root = args
        .root
        .canonicalize()
        .unwrap_or_else(|_| args.root.clone());
    let settings = Settings::from_env(&root)?;
    let paths = Paths::from_env(&root);
    let priority = boost_priority(settings.nice);
    let plan = procs::cpu_plan(&settings)?;
    let sut = plan.sut.as_deref();
    let loadgen_cpus = plan.loadgen.as_deref();
    let workers = settings.workers;
    let base_bin = settings.base.as_ref().map(|b| b.bin.clone());
    for (path, what) in [
        (&paths.proxy, "llm-proxy"),
        (&paths.mock, "mock-upstream"),
        (&paths.loadgen, "loadgen"),
        (&paths.nginx, "nginx"),
    ]
    .into_iter()
    .chain(base_bin.as_ref().map(|b| (b, "llm-proxy (BENCH_BASE_BIN)")))
    {
        if !is_executable(path) {
            return Err(BenchError::Failed(format!(
                "{what} not found at {}",
                path.display()
            )));
        }
    }
    let wanted = settings.wanted_targets()?;
    // The proxy holds two descriptors per stream over HTTP/1 (caller and upstream), every other
    // process one; the children inherit this limit (nginx sets its own, worker_rlimit_nofile).
    let need = 2 * settings
        .stream_concurrency
        .iter()
        .chain(&settings.many_streams)
        .copied()
        .fold(64, u32::max) as u64
        + 512;
    crate::sys::raise_nofile(Some(need));
    let nofile = crate::sys::nofile();
    if nofile < need {
        return Err(BenchError::Failed(format!(
            "open-file limit {nofile} is below the {need} this run needs (ulimit -n)"
        )));
    }

    let workdir = Workdir {
        path: make_workdir()?,
        keep: settings.keep_workdir,
    };
    let wd = workdir.path.as_path();
    log(&format!(
        "work dir {}, pinning {}, workers {workers}, targets {}",
        wd.display(),
        plan.mode,
        wanted.join(", ")
    ));
    let started_utc = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let proxy_env: BTreeMap<String, String> = procs::proxy_env(
        &settings,
        &ProxyEnv {
            upstream_url: "",
            port: 0,
            clients_file: None,
            state_dir: None,
            redis_port: None,
            log_level: "info",
            ca_file: None,
            upstreams_file: None,
            prices_file: None,
        },
    )
    .into_iter()
    .filter(|(k, _)| {
        !matches!(
            k.as_str(),
            "PATH" | "HOME" | "AUTH_BEARER" | "ALLOWED_TOKENS" | "TARGET_HOST" | "PROXY_PORT"
        )
    })
    .collect();

    // Declared after `workdir`, so dropped before it: every server stops before its dir goes.
    let mut procs = Procs::default();
    procs.0.push(procs::start_mock(&paths, wd, sut, false)?);
    log(&format!("mock upstream on port {}", procs.0[0].port));
    let mock_i = 0;
    let mut mock_tls_i = None;
    if wanted.iter().any(|t| is_h2(t)) {
        procs.0.push(procs::start_mock(&paths, wd, sut, true)?);
        mock_tls_i = Some(procs.0.len() - 1);
        log(&format!(
            "TLS mock upstream (h2) on port {}",
            procs.0[procs.0.len() - 1].port
        ));
    }

    // -- footprint -----------------------------------------------------------------------------
    let proxy_bytes = std::fs::read(&paths.proxy)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", paths.proxy.display())))?;
    let proxy_binary = Binary {
        path: relative(&paths.proxy, &root),
        bytes: proxy_bytes.len() as u64,
        stripped: Some(elf_is_stripped(&proxy_bytes)),
    };
    drop(proxy_bytes);
    let nginx_binary = Binary {
        path: paths.nginx.display().to_string(),
        bytes: std::fs::metadata(&paths.nginx).map_or(0, |m| m.len()),
        stripped: None,
    };
    let mut startups = Vec::new();
    for kind in ["proxy", "nginx"] {
        log(&format!("start-up x{}: {kind}", settings.startup_tries));
        startups.push(procs::measure_startup(
            &settings,
            &paths,
            wd,
            kind,
            &paths.proxy,
            &procs.0[mock_i],
            sut,
        )?);
    }
    let startup_nginx = startups.pop();
    let startup_proxy = startups.pop();
    // The base binary's start-up and idle footprint, its tries right after the current one's.
    let startup_base = match &base_bin {
        Some(bin) => {
            log(&format!(
                "start-up x{}: base proxy ({})",
                settings.startup_tries,
                bin.display()
            ));
            Some(procs::measure_startup(
                &settings,
                &paths,
                wd,
                "proxy",
                bin,
                &procs.0[mock_i],
                sut,
            )?)
        }
        None => None,
    };

    // -- the targets ---------------------------------------------------------------------------
    // Index into `procs` of each target's own process (None for "direct").
    let mut owners: BTreeMap<&str, Option<usize>> = BTreeMap::new();
    let mut redis_i = None;
    let upstream_of = |t: &str| {
        if is_h2(t) {
            mock_tls_i.unwrap_or(mock_i)
        } else {
            mock_i
        }
    };
    for &target in &wanted {
        let proc = if target == "nginx" {
            Some(procs::start_nginx(
                &settings,
                &paths,
                wd,
                procs.0[mock_i].port,
                sut,
            )?)
        } else if is_proxy(target) {
            // One redis-server, shared by "shared" and its twin from the base binary.
            if kind(target) == "shared" && redis_i.is_none() {
                procs.0.push(procs::start_redis(&paths, wd, sut)?);
                redis_i = Some(procs.0.len() - 1);
            }
            let redis = redis_i
                .filter(|_| kind(target) == "shared")
                .map(|i| &procs.0[i]);
            let binary = match &base_bin {
                Some(bin) if is_base(target) => bin,
                _ => &paths.proxy,
            };
            Some(procs::start_proxy(
                &settings,
                wd,
                &procs.0[upstream_of(target)],
                sut,
                target,
                redis,
                binary,
            )?)
        } else {
            None
        };
        owners.insert(
            target,
            proc.map(|p| {
                procs.0.push(p);
                procs.0.len() - 1
            }),
        );
    }
    sleep(0.3)?;
    let port_of =
        |t: &str, procs: &Procs| owners[t].map_or(procs.0[mock_i].port, |i| procs.0[i].port);
    for &target in &wanted {
        if let Some(i) = owners[target] {
            let status = procs::http_probe(procs.0[i].port);
            if status != Some(401) {
                return Err(BenchError::Failed(format!(
                    "{target} answered {} to a request without a token, not 401",
                    status.map_or("nothing".to_string(), |s| s.to_string())
                )));
            }
        }
    }
    let proxy_threads_at_start = owners.get("proxy").copied().flatten().map(|i| {
        let names = crate::sys::thread_names(procs.0[i].pid());
        ThreadsAtStart {
            total: names.len(),
            tokio_workers: names
                .iter()
                .filter(|n| n.starts_with("tokio-runtime-w"))
                .count(),
        }
    });
    let nginx_worker_processes = owners
        .get("nginx")
        .copied()
        .flatten()
        .map(|i| procs.0[i].pids().len() - 1);
    let listening: Vec<String> = wanted
        .iter()
        .map(|t| format!("{t} {}", port_of(t, &procs)))
        .collect();
    log(&format!("listening: {}", listening.join(", ")));
    let mut offsets: BTreeMap<&str, u64> = wanted.iter().map(|t| (*t, 0)).collect();
    let run_plain = |target: &'static str,
                     conc: u32,
                     procs: &Procs,
                     offsets: &mut BTreeMap<&str, u64>|
     -> Result<PlainRound, BenchError> {
        let offset = offsets.entry(target).or_insert(0);
        let mut c = Ctx {
            settings: &settings,
            paths: &paths,
            loadgen_cpus,
            port: port_of(target, procs),
            owner: owners[target].map(|i| &procs.0[i]),
            upstream: &procs.0[upstream_of(target)],
            redis: redis_i.map(|i| &procs.0[i]),
            offset,
        };
        measure_plain(&mut c, target, conc)
    };

    // -- plain ---------------------------------------------------------------------------------
    // Rounds interleave the targets (rotating their order), so a burst of outside load or a
    // drift of the machine hits all of them alike; figures are pooled (counts, CPU) or the
    // median of the rounds (percentiles).
    let mut plain: Vec<PlainRow> = Vec::new();
    let targets = &settings.plain_targets;
    let plain_concs = if targets.is_empty() {
        Vec::new()
    } else {
        settings.plain_concurrency.clone()
    };
    let static_name = |t: &str| wanted.iter().copied().find(|w| *w == t).unwrap_or("direct");
    for &conc in &plain_concs {
        if settings.warmup_seconds > 0.0 {
            for target in targets {
                check_interrupted()?;
                run_wrk(
                    &paths,
                    port_of(target, &procs),
                    conc,
                    settings.warmup_seconds,
                    loadgen_cpus,
                )?;
            }
        }
        let mut rounds: BTreeMap<&str, Vec<PlainRound>> = BTreeMap::new();
        for rnd in 0..settings.rounds {
            for target in stats::plain_order(targets, rnd) {
                let target = static_name(&target);
                let one = run_plain(target, conc, &procs, &mut offsets)?;
                log(&format!(
                    "plain c={conc} {target:<10} round {}: {:7.0} req/s p50 {:5} us p99 {:6} us cpu/req {} us errors {} non-2xx {} bg {:.2}",
                    rnd + 1,
                    one.rps,
                    one.latency_us.p50,
                    one.latency_us.p99,
                    one.cpu_us_per_request
                        .map_or("None".to_string(), |v| v.to_string()),
                    one.errors,
                    one.non_2xx,
                    one.window.background_cpu_util.unwrap_or(0.0)
                ));
                rounds.entry(target).or_default().push(one);
            }
        }
        for target in targets {
            let target = static_name(target);
            plain.push(report::pool_plain(
                target,
                conc,
                rounds.remove(target).unwrap_or_default(),
            ));
        }
        report::add_deltas(&mut plain, conc);
    }

    // -- streams -------------------------------------------------------------------------------
    // The 200 and 1000 stream runs, then the "many streams" run(s) with a longer interval
    // between chunks, so that 5000 streams make about as many events a second as 1000 do.
    let mut stream: Vec<StreamRow> = Vec::new();
    let mut runs: Vec<(u32, &Vec<String>, usize, u64)> = settings
        .stream_concurrency
        .iter()
        .map(|&c| {
            (
                c,
                &settings.stream_targets,
                settings.stream_rounds,
                settings.stream_interval_ms,
            )
        })
        .collect();
    runs.extend(settings.many_streams.iter().map(|&c| {
        (
            c,
            &settings.many_targets,
            settings.many_rounds,
            settings.many_interval_ms,
        )
    }));
    for (conc, targets, n_rounds, interval) in runs {
        if targets.is_empty() {
            continue;
        }
        let mut rounds: BTreeMap<&str, Vec<StreamRound>> = BTreeMap::new();
        for rnd in 0..n_rounds {
            for target in stats::stream_order(targets, rnd) {
                let target = static_name(&target);
                let offset = offsets.entry(target).or_insert(0);
                let mut c = Ctx {
                    settings: &settings,
                    paths: &paths,
                    loadgen_cpus,
                    port: port_of(target, &procs),
                    owner: owners[target].map(|i| &procs.0[i]),
                    upstream: &procs.0[upstream_of(target)],
                    redis: redis_i.map(|i| &procs.0[i]),
                    offset,
                };
                let one = measure_stream(&mut c, target, conc, interval)?;
                log(&format!(
                    "stream c={conc}/{interval}ms {target:<10} round {}: {:5} streams ttfc p50 {:.2} ms p99 {:.2} ms gap p99 {:.1} max {:.1} ms cpu/event {} us peak rss {:.1} MiB errors {} gen {:.2} bg {:.2}",
                    rnd + 1,
                    one.streams,
                    one.ttfc_us.p50.unwrap_or(0.0) / 1000.0,
                    one.ttfc_us.p99.unwrap_or(0.0) / 1000.0,
                    one.gap_ms.p99.unwrap_or(0.0),
                    one.gap_ms.max.unwrap_or(0.0),
                    one.cpu_us_per_event
                        .map_or("None".to_string(), |v| v.to_string()),
                    one.peak_rss_kb as f64 / 1024.0,
                    one.errors,
                    one.loadgen_cpu_util.unwrap_or(0.0),
                    one.window.background_cpu_util.unwrap_or(0.0)
                ));
                rounds.entry(target).or_default().push(one);
            }
        }
        for target in targets {
            let target = static_name(target);
            stream.push(report::pool_stream(
                &settings,
                target,
                conc,
                interval,
                rounds.remove(target).unwrap_or_default(),
            ));
        }
        report::add_stream_deltas(&mut stream, conc);
    }

    sleep(1.0)?;
    let mut after = AfterLoad::default();
    if let Some(i) = owners.get("proxy").copied().flatten() {
        let pid = procs.0[i].pid();
        after.proxy_rss_kb = Some(crate::sys::rss_kb(pid));
        after.proxy_pss_kb = Some(crate::sys::pss_kb(pid));
    }
    if let Some(i) = owners.get("nginx").copied().flatten() {
        let pids = procs.0[i].pids();
        after.nginx_rss_kb = Some(pids.iter().map(|&p| crate::sys::rss_kb(p)).sum());
        after.nginx_pss_kb = Some(pids.iter().filter_map(|&p| crate::sys::pss_kb(p)).sum());
    }
    for p in procs.0.iter_mut() {
        if !p.alive() {
            return Err(BenchError::Failed(format!(
                "{} exited during the run",
                p.name
            )));
        }
    }
    drop(procs);
    drop(workdir);

    let (Some(startup_proxy), Some(startup_nginx)) = (startup_proxy, startup_nginx) else {
        return Err(BenchError::Failed("no start-up measurement".into()));
    };
    let growth = report::growth(
        &settings,
        &plain,
        &stream,
        Some(&startup_proxy),
        Some(&startup_nginx),
    );
    let figures = Figures {
        settings: &settings,
        plain: &plain,
        stream: &stream,
        growth: &growth,
        startup_proxy: Some(&startup_proxy),
        startup_nginx: Some(&startup_nginx),
    };
    let targets = report::check_targets(&figures);
    let against_base = settings.base.as_ref().map(|base| {
        report::against_base(
            base,
            &plain,
            &stream,
            Some(&startup_proxy),
            startup_base.as_ref(),
        )
    });
    let elapsed_s = stats::round_to(T0.get_or_init(Instant::now).elapsed().as_secs_f64(), 1);
    let proxy_log = if settings.proxy_log == "file" {
        "stderr -> file in the work dir"
    } else {
        "stderr -> /dev/null"
    };
    let nginx_access_log = if settings.access_log == "file" {
        "file in the work dir (default combined format, unbuffered)"
    } else {
        "off"
    };
    let after_view = match (
        &after.proxy_rss_kb,
        &after.proxy_pss_kb,
        &after.nginx_rss_kb,
        &after.nginx_pss_kb,
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => Some((*a, *b, *c, *d)),
        _ => None,
    };
    let header = Header {
        started_utc: &started_utc,
        pinning: plan.mode,
        workers,
        priority: &priority,
        proxy_log,
        nginx_access_log,
    };
    let table = report::table(
        &header,
        &figures,
        Some(&FootprintView {
            proxy_binary_bytes: proxy_binary.bytes,
            proxy_binary_stripped: proxy_binary.stripped.flatten(),
            nginx_binary_bytes: nginx_binary.bytes,
            nginx_worker_processes,
            after_load: after_view,
            startup_proxy: &startup_proxy,
            startup_nginx: &startup_nginx,
        }),
        &targets,
        against_base.as_ref(),
    );
    let out = settings.out.clone();
    let results = Results {
        meta: Meta {
            started_utc: started_utc.clone(),
            host: crate::sys::hostname(),
            kernel: crate::sys::kernel_release(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            pinning: plan.clone(),
            priority: priority.clone(),
            workers,
            settings: settings.clone(),
            proxy_env,
            proxy_extra_env: std::env::var("BENCH_PROXY_ENV").unwrap_or_default(),
            proxy_log: proxy_log.into(),
            nginx_access_log: nginx_access_log.into(),
            versions: versions(&paths),
            elapsed_s,
        },
        footprint: Footprint {
            proxy_binary,
            nginx_binary,
            startup_proxy,
            startup_nginx,
            proxy_threads_at_start,
            nginx_worker_processes,
            after_load: after,
        },
        plain,
        stream,
        growth,
        targets,
        against_base,
    };
    let json =
        serde_json::to_string_pretty(&results).map_err(|e| BenchError::Failed(e.to_string()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| BenchError::Failed(format!("{}: {e}", dir.display())))?;
    }
    std::fs::write(&out, json + "\n")
        .map_err(|e| BenchError::Failed(format!("{}: {e}", out.display())))?;
    print!("{table}");
    println!("\nJSON: {}   (driver time {elapsed_s:.0} s)", out.display());
    Ok(())
}

pub fn main(args: Args) -> ExitCode {
    T0.get_or_init(Instant::now);
    let flag = STOP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(err) = signal_hook::flag::register(signal, flag.clone()) {
            log(&format!("FAILED: cannot handle signal {signal}: {err}"));
            return ExitCode::FAILURE;
        }
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(BenchError::Failed(err)) => {
            log(&format!("FAILED: {err}"));
            ExitCode::FAILURE
        }
        Err(BenchError::Interrupted) => {
            log("interrupted");
            ExitCode::from(130)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripped_elf_files_are_told_apart() {
        // A 64-bit little-endian ELF header with two section headers at 0x40, 64 bytes each.
        let mut elf = vec![0u8; 0x40 + 2 * 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x28] = 0x40; // e_shoff
        elf[0x3A] = 64; // e_shentsize
        elf[0x3C] = 2; // e_shnum
        elf[0x40 + 64 + 4] = 3; // SHT_STRTAB
        assert_eq!(elf_is_stripped(&elf), Some(true));
        elf[0x40 + 64 + 4] = 2; // SHT_SYMTAB
        assert_eq!(elf_is_stripped(&elf), Some(false));
        assert_eq!(elf_is_stripped(b"#!/bin/sh\n"), None);
        // The test binary itself is not stripped.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_is_stripped(&me), Some(false));
    }
}
