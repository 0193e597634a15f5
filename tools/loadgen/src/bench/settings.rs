//! The BENCH_* settings, their defaults, and where the binaries are.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::BenchError;

/// Every target, in the order the run reports them (what each is: see the module doc).
pub const ALL_TARGETS: [&str; 11] = [
    "direct",
    "nginx",
    "proxy",
    "proxy-h2",
    "quiet",
    "routed",
    "limited",
    "priced",
    "shared",
    "clients1",
    "clients10k",
];

/// The twins of the llm-proxy targets run from BENCH_BASE_BIN, each configured as the target
/// after its `base:` prefix.
pub const BASE_TWINS: [&str; 9] = [
    "base:proxy",
    "base:proxy-h2",
    "base:quiet",
    "base:routed",
    "base:limited",
    "base:priced",
    "base:shared",
    "base:clients1",
    "base:clients10k",
];

/// The targets BENCH_BASE_TARGETS names by default: those the base binary (the commit before
/// issue 17's refactor) can run; it has no routing (routed) nor prices (priced).
pub const DEFAULT_BASE_TARGETS: [&str; 6] = [
    "proxy",
    "quiet",
    "limited",
    "clients1",
    "clients10k",
    "proxy-h2",
];

const BASE_PREFIX: &str = "base:";

/// The twin of `target` run from the base binary ("proxy" -> "base:proxy"), if it can have one.
pub fn twin_of(target: &str) -> Option<&'static str> {
    BASE_TWINS
        .into_iter()
        .find(|t| t.strip_prefix(BASE_PREFIX) == Some(target))
}

/// True for a twin run from the base binary.
pub fn is_base(target: &str) -> bool {
    target.starts_with(BASE_PREFIX)
}

/// The target whose configuration `target` has: itself, or for a twin the one it twins.
pub fn kind(target: &str) -> &str {
    target.strip_prefix(BASE_PREFIX).unwrap_or(target)
}

/// The llm-proxy instances.
pub fn is_proxy(target: &str) -> bool {
    !matches!(target, "direct" | "nginx")
}

/// Behind the TLS HTTP/2 mock; every other target reaches (or is, for "direct") the plain one,
/// so only those are compared with "direct".
pub fn is_h2(target: &str) -> bool {
    kind(target) == "proxy-h2"
}

/// `targets` with the twin of each one in `twinned` right after it.
pub fn with_twins(targets: &[String], twinned: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(targets.len() * 2);
    for t in targets {
        out.push(t.clone());
        if twinned.contains(t)
            && let Some(twin) = twin_of(t)
        {
            out.push(twin.to_string());
        }
    }
    out
}

pub const CLIENT_TOKEN: &str = "bench-client-token-6f1d";
pub const UPSTREAM_KEY: &str = "sk-bench-upstream-0c9a";

/// BENCH_BASE_BIN and BENCH_BASE_TARGETS: an older llm-proxy measured next to the current one.
#[derive(Serialize, Debug, Clone)]
pub struct Base {
    pub bin: PathBuf,
    /// The targets given a twin (those of BENCH_BASE_TARGETS that are llm-proxy targets).
    pub targets: Vec<String>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Settings {
    pub plain_seconds: f64,
    pub rounds: usize,
    pub warmup_seconds: f64,
    pub stream_seconds: f64,
    pub stream_rounds: usize,
    pub plain_concurrency: Vec<u32>,
    pub stream_concurrency: Vec<u32>,
    pub stream_chunks: u64,
    pub stream_interval_ms: u64,
    pub many_streams: Vec<u32>,
    pub many_interval_ms: u64,
    pub many_rounds: usize,
    pub plain_targets: Vec<String>,
    pub stream_targets: Vec<String>,
    pub many_targets: Vec<String>,
    pub clients: usize,
    pub startup_tries: usize,
    pub pin: String,
    pub workers: u32,
    pub proxy_log: String,
    pub access_log: String,
    pub out: PathBuf,
    pub nice: i32,
    pub keep_workdir: bool,
    /// Unset: no twins, and nothing about them in the results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
}

/// A setting's value, None when unset or blank (an empty value counts as unset).
fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BenchError> {
    match var(name) {
        None => Ok(default),
        Some(raw) => raw
            .parse()
            .map_err(|_| BenchError::Failed(format!("{name} must be a number, not {raw:?}"))),
    }
}

/// A comma-separated list of numbers; "none" is the empty list.
fn numbers(name: &str, default: &[u32]) -> Result<Vec<u32>, BenchError> {
    match var(name).as_deref() {
        None => Ok(default.to_vec()),
        Some("none") => Ok(Vec::new()),
        Some(raw) => raw
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| {
                x.parse().map_err(|_| {
                    BenchError::Failed(format!(
                        "{name} must be numbers separated by commas, not {raw:?}"
                    ))
                })
            })
            .collect(),
    }
}

/// A comma-separated list of target names; "none" is the empty list.
fn names(name: &str, default: &[&str]) -> Vec<String> {
    match var(name).as_deref() {
        None => default.iter().map(|s| s.to_string()).collect(),
        Some("none") => Vec::new(),
        Some(raw) => raw
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect(),
    }
}

impl Settings {
    pub fn from_env(root: &Path) -> Result<Self, BenchError> {
        let mut settings = Settings {
            plain_seconds: number("BENCH_SECONDS", 2.0)?,
            rounds: number("BENCH_ROUNDS", 4)?.max(1),
            warmup_seconds: number("BENCH_WARMUP_SECONDS", 1.0)?,
            stream_seconds: number("BENCH_STREAM_SECONDS", 6.0)?,
            stream_rounds: number("BENCH_STREAM_ROUNDS", 2)?.max(1),
            plain_concurrency: numbers("BENCH_PLAIN_CONCURRENCY", &[1, 32])?,
            stream_concurrency: numbers("BENCH_STREAM_CONCURRENCY", &[200, 1000])?,
            stream_chunks: number("BENCH_CHUNKS", 20)?,
            stream_interval_ms: number("BENCH_INTERVAL_MS", 50)?,
            many_streams: numbers("BENCH_MANY_STREAMS", &[5000])?,
            many_interval_ms: number("BENCH_MANY_INTERVAL_MS", 250)?,
            many_rounds: number("BENCH_MANY_ROUNDS", 1)?.max(1),
            // Each feature row next to the row it is compared with (see `plain_order`).
            plain_targets: names(
                "BENCH_PLAIN_TARGETS",
                &[
                    "direct",
                    "nginx",
                    "quiet",
                    "proxy",
                    "routed",
                    "limited",
                    "priced",
                    "shared",
                    "clients1",
                    "clients10k",
                ],
            ),
            // "routed" next to "proxy": its CPU per chunk is compared with the proxy's.
            stream_targets: names(
                "BENCH_STREAM_TARGETS",
                &["direct", "nginx", "proxy", "routed", "proxy-h2"],
            ),
            many_targets: names(
                "BENCH_MANY_TARGETS",
                &["direct", "nginx", "proxy", "proxy-h2"],
            ),
            clients: number("BENCH_CLIENTS", 10_000)?.max(2),
            startup_tries: number("BENCH_STARTUP_TRIES", 10)?,
            pin: var("BENCH_PIN").unwrap_or_else(|| "split".into()),
            workers: number("BENCH_WORKERS", 2)?,
            proxy_log: var("BENCH_PROXY_LOG").unwrap_or_else(|| "file".into()),
            access_log: var("BENCH_ACCESS_LOG").unwrap_or_else(|| "file".into()),
            out: var("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target").join("bench").join("results.json")),
            nice: number("BENCH_NICE", -10)?,
            keep_workdir: var("BENCH_KEEP_WORKDIR").is_some_and(|v| v != "0" && v != "false"),
            base: None,
        };
        if let Some(bin) = var("BENCH_BASE_BIN") {
            let targets = names("BENCH_BASE_TARGETS", &DEFAULT_BASE_TARGETS);
            settings.set_base(PathBuf::from(bin), targets)?;
        }
        Ok(settings)
    }

    /// Gives each target of `targets` in every phase's list a twin run from `bin`, right after
    /// it (the orders keep the two next to each other: `stats::plain_order`, `stream_order`).
    pub fn set_base(&mut self, bin: PathBuf, targets: Vec<String>) -> Result<(), BenchError> {
        let cannot: Vec<&str> = targets
            .iter()
            .map(String::as_str)
            .filter(|t| twin_of(t).is_none())
            .collect();
        if !cannot.is_empty() {
            return Err(BenchError::Failed(format!(
                "BENCH_BASE_TARGETS: {} cannot run from the base binary (llm-proxy targets only: {})",
                cannot.join(", "),
                BASE_TWINS.map(kind).join(", ")
            )));
        }
        self.plain_targets = with_twins(&self.plain_targets, &targets);
        self.stream_targets = with_twins(&self.stream_targets, &targets);
        self.many_targets = with_twins(&self.many_targets, &targets);
        self.base = Some(Base { bin, targets });
        Ok(())
    }

    /// Every target some phase measures, in ALL_TARGETS order; unknown names are an error.
    pub fn wanted_targets(&self) -> Result<Vec<&'static str>, BenchError> {
        let named: Vec<&String> = self
            .plain_targets
            .iter()
            .chain(&self.stream_targets)
            .chain(&self.many_targets)
            .collect();
        let twins_allowed = self.base.is_some();
        let mut unknown: Vec<&str> = named
            .iter()
            .map(|s| s.as_str())
            .filter(|n| !(ALL_TARGETS.contains(n) || (twins_allowed && BASE_TWINS.contains(n))))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        if !unknown.is_empty() {
            return Err(BenchError::Failed(format!(
                "unknown target(s) {} in BENCH_*_TARGETS (known: {})",
                unknown.join(", "),
                ALL_TARGETS.join(", ")
            )));
        }
        // Each twin right after its target: it copies that one's files (see `start_proxy`).
        Ok(ALL_TARGETS
            .into_iter()
            .flat_map(|t| [Some(t), twin_of(t)])
            .flatten()
            .filter(|t| named.iter().any(|n| n == t))
            .collect())
    }

    /// The concurrency the KB-per-stream figure starts from (the largest of
    /// BENCH_STREAM_CONCURRENCY) and the one it ends at (the largest of BENCH_MANY_STREAMS).
    pub fn rss_reference(&self) -> (Option<u32>, Option<u32>) {
        (
            self.stream_concurrency.iter().copied().max(),
            self.many_streams.iter().copied().max(),
        )
    }

    /// Every llm-proxy's MAX_CONCURRENT_REQUESTS: room for the largest stream run (the default,
    /// 1024, would refuse most of 5000 streams).
    pub fn max_concurrent_requests(&self) -> u32 {
        self.stream_concurrency
            .iter()
            .chain(&self.many_streams)
            .map(|c| c + 1000)
            .fold(1024, u32::max)
    }
}

/// Where the binaries and tools are.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub proxy: PathBuf,
    pub mock: PathBuf,
    pub loadgen: PathBuf,
    pub nginx: PathBuf,
    pub wrk: PathBuf,
    pub redis: PathBuf,
    pub nginx_template: PathBuf,
    pub wrk_script: PathBuf,
}

/// The first executable `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Paths {
    pub fn from_env(root: &Path) -> Self {
        let target_dir = var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"));
        let release = root.join(target_dir).join("release");
        let bin = |var_name: &str, fallback: PathBuf| {
            var(var_name).map(PathBuf::from).unwrap_or(fallback)
        };
        let tool = |var_name: &str, name: &str, fallback: &str| {
            var(var_name)
                .map(PathBuf::from)
                .or_else(|| which(name))
                .unwrap_or_else(|| PathBuf::from(fallback))
        };
        Paths {
            proxy: bin("BENCH_PROXY_BIN", release.join("llm-proxy")),
            mock: bin("BENCH_MOCK_BIN", release.join("mock-upstream")),
            loadgen: bin(
                "BENCH_LOADGEN_BIN",
                std::env::current_exe().unwrap_or_else(|_| release.join("loadgen")),
            ),
            nginx: tool("BENCH_NGINX_BIN", "nginx", "/usr/sbin/nginx"),
            wrk: tool("BENCH_WRK_BIN", "wrk", "wrk"),
            redis: tool("BENCH_REDIS_BIN", "redis-server", "/usr/bin/redis-server"),
            nginx_template: root.join("scripts/bench/nginx.conf.template"),
            wrk_script: root.join("scripts/bench/plain.lua"),
            root: root.to_path_buf(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The default settings, whatever the test's environment says.
    pub(in crate::bench) fn defaults() -> Settings {
        settings()
    }

    fn settings() -> Settings {
        // Defaults, whatever the test's environment says.
        Settings {
            plain_seconds: 2.0,
            rounds: 4,
            warmup_seconds: 1.0,
            stream_seconds: 6.0,
            stream_rounds: 2,
            plain_concurrency: vec![1, 32],
            stream_concurrency: vec![200, 1000],
            stream_chunks: 20,
            stream_interval_ms: 50,
            many_streams: vec![5000],
            many_interval_ms: 250,
            many_rounds: 1,
            plain_targets: vec!["quiet".into(), "direct".into()],
            stream_targets: vec!["proxy-h2".into()],
            many_targets: vec![],
            clients: 10_000,
            startup_tries: 10,
            pin: "split".into(),
            workers: 2,
            proxy_log: "file".into(),
            access_log: "file".into(),
            out: PathBuf::from("results.json"),
            nice: -10,
            keep_workdir: false,
            base: None,
        }
    }

    #[test]
    fn wanted_targets_follow_the_report_order_and_reject_unknown_names() {
        let mut s = settings();
        assert_eq!(s.wanted_targets().unwrap(), ["direct", "proxy-h2", "quiet"]);
        s.many_targets = vec!["proxy2".into()];
        let Err(BenchError::Failed(msg)) = s.wanted_targets() else {
            panic!("an unknown target was accepted");
        };
        assert!(msg.starts_with("unknown target(s) proxy2 in BENCH_*_TARGETS"));
    }

    #[test]
    fn twins_follow_their_targets_and_only_llm_proxy_targets_have_one() {
        let mut s = settings();
        s.plain_targets = ["direct", "proxy", "routed", "limited"]
            .map(String::from)
            .to_vec();
        s.stream_targets = vec!["proxy-h2".into()];
        let twinned = ["proxy", "limited", "proxy-h2"].map(String::from).to_vec();
        s.set_base(PathBuf::from("/old/llm-proxy"), twinned)
            .unwrap();
        assert_eq!(
            s.plain_targets,
            [
                "direct",
                "proxy",
                "base:proxy",
                "routed",
                "limited",
                "base:limited"
            ]
        );
        assert_eq!(s.stream_targets, ["proxy-h2", "base:proxy-h2"]);
        assert_eq!(
            s.wanted_targets().unwrap(),
            [
                "direct",
                "proxy",
                "base:proxy",
                "proxy-h2",
                "base:proxy-h2",
                "routed",
                "limited",
                "base:limited"
            ]
        );
        assert!(is_h2("base:proxy-h2") && !is_h2("base:proxy"));
        assert_eq!(kind("base:clients10k"), "clients10k");
        assert!(is_base("base:proxy") && !is_base("proxy"));

        let Err(BenchError::Failed(msg)) =
            settings().set_base(PathBuf::from("/old"), vec!["nginx".into()])
        else {
            panic!("nginx was given a twin");
        };
        assert!(msg.starts_with("BENCH_BASE_TARGETS: nginx cannot run"));
        // Without a base binary, a twin's name is an unknown target.
        let mut s = settings();
        s.plain_targets = vec!["base:proxy".into()];
        assert!(s.wanted_targets().is_err());
    }

    #[test]
    fn the_proxy_has_room_for_the_largest_stream_run() {
        let mut s = settings();
        assert_eq!(s.max_concurrent_requests(), 6000);
        s.stream_concurrency.clear();
        s.many_streams.clear();
        assert_eq!(s.max_concurrent_requests(), 1024);
        assert_eq!(s.rss_reference(), (None, None));
    }
}
