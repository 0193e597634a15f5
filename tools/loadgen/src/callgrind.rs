//! `loadgen callgrind`: instruction counts of llm-proxy per plain request and per streamed chunk.
//!
//! Instruction counts do not depend on what else the machine is doing, so on a shared machine
//! they are the before/after evidence that timings cannot be. The release proxy runs under
//! `valgrind --tool=callgrind` (one tokio worker unless --workers) against the release mock
//! upstream; the counters are zeroed after a warm-up and dumped after each load:
//!
//! * plain: --plain chat completions, one keep-alive connection, one at a time;
//!   instructions / requests;
//! * stream: --streams SSE streams of --short and then of --long chunks, --concurrency at a time
//!   (a connection each, kept alive); the difference of the two loads over the difference in
//!   chunks cancels the per-request cost: instructions per chunk.
//!
//! --priced is the bench's "priced" target: --limited with dollar budgets and PRICES_FILE.
//! --limited gives the benchmark's client the limits of the bench's "limited" target (every
//! limit set, none reached, and a model list). --clients N puts the token in a clients file of
//! N clients (one is the benchmark's), to see how the token lookup grows with the number of
//! clients (the clients-file watcher, which runs on a clock rather than per request, is left out
//! of the counts). --routed starts the proxy as the bench's "routed" target: UPSTREAMS_FILE with
//! 3 upstreams (each the same mock), 30 model patterns and 10 aliases, the benchmark's model in a
//! weighted tier; against a run without it, what routing by model costs per request and per
//! chunk. Prints one JSON object. Needs valgrind (Debian package `valgrind`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::bench::{DOLLAR_BUDGETS, LIMITS, PRICES, write_upstreams_file};
use crate::sys;

const TOKEN: &str = "bench-client-token-6f1d";
const KEY: &str = "sk-bench-upstream-0c9a";
const PLAIN_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_BODY: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The release proxy (default: next to this binary).
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// The release mock upstream (default: next to this binary).
    #[arg(long)]
    mock: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Clients in the clients file (0: the token in ALLOWED_TOKENS).
    #[arg(long, default_value_t = 0)]
    clients: usize,
    /// Give the benchmark's client the bench's limits (implies --clients 1).
    #[arg(long)]
    limited: bool,
    /// The bench's "priced" target: the limited client with dollar budgets, and PRICES_FILE
    /// (implies --limited).
    #[arg(long)]
    priced: bool,
    /// Route by model through the bench's upstreams file (the "routed" target).
    #[arg(long)]
    routed: bool,
    #[arg(long, default_value_t = 2000)]
    plain: usize,
    #[arg(long, default_value_t = 60)]
    streams: usize,
    #[arg(long, default_value_t = 5)]
    short: usize,
    #[arg(long, default_value_t = 45)]
    long: usize,
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    #[arg(long, value_parser = ["plain", "stream"])]
    skip: Option<String>,
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Result<Sender, String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One POST on the connection; the status and the whole body.
async fn post(
    sender: &mut Sender,
    body: &'static str,
    chunks: Option<(usize, u64)>,
) -> Result<(u16, Bytes), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let mut req = Request::post("/v1/chat/completions")
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json");
    if let Some((chunks, interval_ms)) = chunks {
        req = req
            .header("x-mock-chunks", chunks.to_string())
            .header("x-mock-interval-ms", interval_ms.to_string());
    }
    let req = req
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

async fn plain(port: u16, count: usize) -> Result<(), String> {
    let mut sender = connect(port).await?;
    for _ in 0..count {
        let (status, _) = post(&mut sender, PLAIN_BODY, None).await?;
        if status != 200 {
            return Err(format!("plain request answered {status}"));
        }
    }
    Ok(())
}

async fn streams(
    port: u16,
    count: usize,
    chunks: usize,
    interval_ms: u64,
    concurrency: usize,
) -> Result<(), String> {
    let left = Arc::new(AtomicUsize::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let left = left.clone();
        tasks.spawn(async move {
            let mut sender = connect(port).await?;
            let mut failures = Vec::new();
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let (status, body) =
                    post(&mut sender, STREAM_BODY, Some((chunks, interval_ms))).await?;
                if status != 200 || memchr::memmem::find_iter(&body, b"data:").count() < chunks {
                    failures.push(status);
                }
            }
            Ok::<_, String>(failures)
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        failures.extend(done.map_err(|e| e.to_string())??);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        failures.truncate(5);
        Err(format!("streams failed: {failures:?}"))
    }
}

fn clients_file(path: &Path, count: usize, limited: bool, priced: bool) -> std::io::Result<()> {
    let mut text = format!("[clients.bench]\ntoken = \"{TOKEN}\"\n");
    if limited {
        text.push_str(LIMITS);
    }
    if priced {
        text.push_str(DOLLAR_BUDGETS);
    }
    for n in 1..count {
        text.push_str(&format!(
            "[clients.c{n}]\ntoken = \"client-token-{n:08}-padding\"\n"
        ));
    }
    std::fs::write(path, text)
}

/// Instructions of the clients-file watcher, which runs on a clock (it hashes the file once a
/// second), not per request: under valgrind's slowdown it would be counted many times over.
fn background(path: &Path) -> u64 {
    let Ok(out) = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(path)
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("reload::Reloader::run"))
        .filter_map(|line| {
            line.split_whitespace()
                .next()
                .and_then(|n| n.replace(',', "").parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
}

/// The total instruction count of a callgrind dump (its `summary:` or `totals:` line).
fn dump_total(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix("summary: ")
            .or_else(|| line.strip_prefix("totals: "))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    })
}

fn wait_listening(port: u16, child: &mut Child, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Stops the child on every way out.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Proxy {
    guard: Guard,
    port: u16,
    dir: PathBuf,
}

impl Proxy {
    fn control(&self, flag: &str) -> Result<(), String> {
        let status = Command::new("callgrind_control")
            .arg(flag)
            .arg(self.guard.0.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("callgrind_control: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("callgrind_control {flag} failed ({status})"))
        }
    }

    fn dumps(&self) -> HashSet<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }

    /// Instructions the proxy executed (all threads) while `load` ran.
    fn measure(
        &self,
        runtime: &tokio::runtime::Runtime,
        load: impl Future<Output = Result<(), String>>,
    ) -> Result<u64, String> {
        self.control("-z")?;
        runtime.block_on(load)?;
        std::thread::sleep(Duration::from_millis(300)); // let the access lines of the last requests be written
        let before = self.dumps();
        self.control("-d")?;
        let mut new: Vec<PathBuf> = self.dumps().difference(&before).cloned().collect();
        new.sort();
        let mut total = 0u64;
        for path in new {
            let is_dump = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("callgrind.out"));
            if !is_dump {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            total += dump_total(&text).unwrap_or(0);
            total = total.saturating_sub(background(&path));
        }
        Ok(total)
    }
}

fn release_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The one JSON object printed: the set-up, then the counts of the loads that ran.
#[derive(Serialize)]
struct Counts {
    proxy: String,
    workers: u32,
    clients: usize,
    limited: bool,
    priced: bool,
    routed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    plain_requests: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions_per_request: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    streams: Option<usize>,
    /// instructions_per_stream_SHORT_chunks.
    #[serde(flatten)]
    per_stream: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions_per_chunk: Option<i64>,
    workdir: String,
}

fn run(args: &Args, runtime: &tokio::runtime::Runtime) -> Result<Counts, String> {
    let proxy_bin = args
        .proxy
        .clone()
        .unwrap_or_else(|| release_bin("llm-proxy"));
    let mock_bin = args
        .mock
        .clone()
        .unwrap_or_else(|| release_bin("mock-upstream"));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let workdir = std::env::temp_dir().join(format!(
        "llm-proxy-callgrind-{}-{nanos:09}",
        std::process::id()
    ));
    std::fs::create_dir(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;

    let free = || sys::free_port().map_err(|e| format!("no free port: {e}"));
    let mock_port = free()?;
    let mut mock = Guard(
        Command::new(&mock_bin)
            .args(["--port", &mock_port.to_string(), "--no-record"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", mock_bin.display()))?,
    );
    if !wait_listening(mock_port, &mut mock.0, 60) {
        return Err("mock-upstream did not start".into());
    }

    let clients = if args.limited || args.priced {
        args.clients.max(1)
    } else {
        args.clients
    };
    let port = free()?;
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}",
            workdir.join("callgrind.out").display()
        ))
        .arg(&proxy_bin)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .env("PROXY_PORT", port.to_string())
        .env("PROXY_HOST", "127.0.0.1")
        .env("LOG_LEVEL", "info")
        .env("AUTH_VALIDATION", "true")
        // Both names: a binary from before WORKER_THREADS only knew tokio's.
        .env("TOKIO_WORKER_THREADS", args.workers.to_string())
        .env("WORKER_THREADS", args.workers.to_string());
    let mock_url = format!("http://127.0.0.1:{mock_port}");
    if args.routed {
        // A directory of its own, as for the clients file below.
        let dir = workdir.join("upstreams");
        let path =
            write_upstreams_file(&dir, &mock_url).map_err(|e| format!("{}: {e}", dir.display()))?;
        cmd.env("UPSTREAMS_FILE", &path);
    } else {
        cmd.env("TARGET_HOST", &mock_url).env("AUTH_BEARER", KEY);
    }
    if clients > 0 {
        // A directory of its own (as a ConfigMap mount is): the proxy watches the file's
        // directory, and its log is written in the work dir.
        let dir = workdir.join("clients");
        let path = dir.join("clients.toml");
        std::fs::create_dir(&dir)
            .and_then(|_| clients_file(&path, clients, args.limited || args.priced, args.priced))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.env("CLIENTS_FILE", &path)
            .env("STATE_DIR", workdir.join("state"));
    } else {
        cmd.env("ALLOWED_TOKENS", TOKEN);
    }
    if args.priced {
        let dir = workdir.join("prices");
        let path = dir.join("prices.toml");
        std::fs::create_dir(&dir)
            .and_then(|_| std::fs::write(&path, PRICES))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.env("PRICES_FILE", &path);
    }
    let log_path = workdir.join("proxy.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    cmd.current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut proxy = Proxy {
        guard: Guard(cmd.spawn().map_err(|e| format!("valgrind: {e}"))?),
        port,
        dir: workdir.clone(),
    };
    if !wait_listening(port, &mut proxy.guard.0, 60) {
        return Err(format!(
            "the proxy did not start (see {})",
            log_path.display()
        ));
    }

    let mut result = Counts {
        proxy: proxy_bin.display().to_string(),
        workers: args.workers,
        clients,
        limited: args.limited,
        priced: args.priced,
        routed: args.routed,
        plain_requests: None,
        instructions_per_request: None,
        streams: None,
        per_stream: BTreeMap::new(),
        instructions_per_chunk: None,
        workdir: workdir.display().to_string(),
    };
    runtime.block_on(plain(proxy.port, 50))?;
    runtime.block_on(streams(
        proxy.port,
        args.concurrency,
        2,
        args.interval_ms,
        args.concurrency,
    ))?;
    if args.skip.as_deref() != Some("plain") {
        let total = proxy.measure(runtime, plain(proxy.port, args.plain))?;
        result.plain_requests = Some(args.plain);
        result.instructions_per_request =
            Some((total as f64 / args.plain.max(1) as f64).round() as u64);
    }
    if args.skip.as_deref() != Some("stream") {
        let load = |chunks| {
            streams(
                proxy.port,
                args.streams,
                chunks,
                args.interval_ms,
                args.concurrency,
            )
        };
        let short = proxy.measure(runtime, load(args.short))?;
        let long = proxy.measure(runtime, load(args.long))?;
        let chunks = (args.streams * args.long.saturating_sub(args.short)).max(1) as f64;
        result.streams = Some(args.streams);
        result.per_stream.insert(
            format!("instructions_per_stream_{}_chunks", args.short),
            (short as f64 / args.streams.max(1) as f64).round() as u64,
        );
        result.instructions_per_chunk =
            Some(((long as f64 - short as f64) / chunks).round() as i64);
    }
    drop(proxy);
    drop(mock);
    Ok(result)
}

pub fn main(args: Args, runtime: &tokio::runtime::Runtime) -> ExitCode {
    match run(&args, runtime)
        .and_then(|r| serde_json::to_string_pretty(&r).map_err(|e| e.to_string()))
    {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("loadgen callgrind: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_totals_are_read_from_summary_or_totals() {
        assert_eq!(
            dump_total("version: 1\ncmd: x\nsummary: 123456\n"),
            Some(123456)
        );
        assert_eq!(dump_total("events: Ir\ntotals: 42\n"), Some(42));
        assert_eq!(dump_total("events: Ir\n"), None);
    }
}
