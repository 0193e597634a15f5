//! The processes of a run: the mock upstreams, redis-server, nginx and the llm-proxy targets,
//! started pinned and stopped on every way out; and the commands (wrk, `loadgen sse`) run to
//! completion with a time limit.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;

use super::settings::{CLIENT_TOKEN, Paths, Settings, UPSTREAM_KEY, is_base, kind};
use super::{BenchError, check_interrupted};
use crate::rng::Rng;
use crate::sys;

/// A server process of ours; `pids()` lists the processes whose CPU and memory count.
pub struct Proc {
    pub name: String,
    child: Child,
    pub port: u16,
    pub log_path: Option<PathBuf>,
    /// Processes whose cost is this one's too (the "shared" proxy's redis-server).
    pub helpers: Vec<u32>,
    /// A mock upstream's base URL and, in TLS mode, the certificate to trust.
    pub url: String,
    pub ca_file: Option<PathBuf>,
}

impl Proc {
    fn new(name: &str, child: Child, port: u16) -> Self {
        Proc {
            name: name.to_string(),
            child,
            port,
            log_path: None,
            helpers: Vec::new(),
            url: String::new(),
            ca_file: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        if self.name == "nginx" {
            pids.extend(sys::children_of(self.pid()));
        }
        pids.extend(&self.helpers);
        pids
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// nginx: QUIT is its graceful stop; the proxy, the mock and redis stop on TERM.
    pub fn stop(&mut self) {
        let signal = if self.name == "nginx" {
            libc::SIGQUIT
        } else {
            libc::SIGTERM
        };
        stop_child(&mut self.child, signal, Duration::from_secs(10));
    }
}

/// Sends `signal`, waits up to `timeout`, then kills.
fn stop_child(child: &mut Child, signal: libc::c_int, timeout: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: kill only sends a signal to our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The servers of a run, stopped in reverse order when it ends, however it ends.
#[derive(Default)]
pub struct Procs(pub Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in self.0.iter_mut().rev() {
            p.stop();
        }
    }
}

/// Where the CPU plan puts the load generator and the system under test.
#[derive(serde::Serialize, Debug, Clone)]
pub struct Plan {
    pub mode: &'static str,
    pub loadgen: Option<Vec<usize>>,
    pub sut: Option<Vec<usize>>,
}

pub fn cpu_plan(settings: &Settings) -> Result<Plan, BenchError> {
    let allowed = sys::allowed_cpus();
    if settings.pin == "split" && allowed.len() >= 2 && super::settings::which("taskset").is_some()
    {
        return Ok(Plan {
            mode: "split",
            loadgen: Some(vec![allowed[0]]),
            sut: Some(vec![allowed[1]]),
        });
    }
    if settings.pin != "split" && settings.pin != "none" {
        return Err(BenchError::Failed(format!(
            "BENCH_PIN must be split or none, not {:?}",
            settings.pin
        )));
    }
    Ok(Plan {
        mode: "none",
        loadgen: None,
        sut: None,
    })
}

/// `program args...`, under `taskset -c CPUS` when pinned.
pub fn pinned(program: &Path, cpus: Option<&[usize]>) -> Command {
    match cpus {
        Some(cpus) if !cpus.is_empty() => {
            let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(list.join(",")).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

fn create(path: &Path) -> Result<File, BenchError> {
    File::create(path).map_err(|e| BenchError::Failed(format!("{}: {e}", path.display())))
}

fn append(path: &Path) -> Result<File, BenchError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", path.display())))
}

fn spawn(cmd: &mut Command, what: &str) -> Result<Child, BenchError> {
    cmd.spawn()
        .map_err(|e| BenchError::Failed(format!("cannot start {what}: {e}")))
}

/// `child` once something accepts connections on `port`; else it is ended and the error says
/// where to look (`log`).
fn listening(
    mut child: Child,
    port: u16,
    what: &str,
    log: impl std::fmt::Display,
) -> Result<Child, BenchError> {
    if wait_listening(port, &mut child, Duration::from_secs(10))? {
        return Ok(child);
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(BenchError::Failed(format!(
        "{what} did not start (see {log})"
    )))
}

/// True once something accepts connections on the port; false if the process exits or
/// `timeout` passes first.
pub fn wait_listening(port: u16, child: &mut Child, timeout: Duration) -> Result<bool, BenchError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        check_interrupted()?;
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .is_ok()
        {
            return Ok(true);
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(false)
}

/// The mock upstream; with `tls`, its HTTPS mode (ALPN h2 and http/1.1), whose self-signed
/// certificate lands in WORKDIR/mock-tls/cert.pem (`Proc::ca_file`).
pub fn start_mock(
    paths: &Paths,
    workdir: &Path,
    cpus: Option<&[usize]>,
    tls: bool,
) -> Result<Proc, BenchError> {
    let name = if tls { "mock-tls" } else { "mock" };
    let out_path = workdir.join(format!("{name}.out"));
    let tls_dir = workdir.join(name);
    let mut cmd = pinned(&paths.mock, cpus);
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--no-record"]);
    if tls {
        cmd.arg("--tls-self-signed").arg(&tls_dir);
    }
    cmd.stdout(create(&out_path)?)
        .stderr(create(&workdir.join(format!("{name}.err")))?)
        .stdin(Stdio::null())
        .current_dir(workdir);
    let mut child = spawn(&mut cmd, "mock-upstream")?;
    let listening = Regex::new(r"listening on (https?)://[^\s:]+:(\d+)")
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(m) = listening.captures(&text) {
            let port: u16 = m[2].parse().unwrap_or(0);
            let mut proc = Proc::new(name, child, port);
            proc.url = format!("{}://127.0.0.1:{port}", &m[1]);
            proc.ca_file = tls.then(|| tls_dir.join("cert.pem"));
            return Ok(proc);
        }
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        check_interrupted().inspect_err(|_| {
            let _ = child.kill();
        })?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(BenchError::Failed(format!(
        "mock-upstream ({name}) did not start (see {})",
        out_path.display()
    )))
}

fn port() -> Result<u16, BenchError> {
    sys::free_port().map_err(|e| BenchError::Failed(format!("no free port: {e}")))
}

/// A redis-server for the "shared" proxy: loopback, no persistence, on the SUT's CPUs.
pub fn start_redis(
    paths: &Paths,
    workdir: &Path,
    cpus: Option<&[usize]>,
) -> Result<Proc, BenchError> {
    let port = port()?;
    let log_path = workdir.join("redis.log");
    let log = create(&log_path)?;
    let log2 = log
        .try_clone()
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let mut cmd = pinned(&paths.redis, cpus);
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(workdir)
        .stdout(log)
        .stderr(log2)
        .stdin(Stdio::null())
        .current_dir(workdir);
    let child = spawn(&mut cmd, "redis-server")?;
    let child = listening(child, port, "redis-server", log_path.display())?;
    Ok(Proc::new("redis", child, port))
}

/// An llm-proxy's environment (and nothing else from ours but PATH and HOME).
pub struct ProxyEnv<'a> {
    pub upstream_url: &'a str,
    pub port: u16,
    pub clients_file: Option<&'a Path>,
    pub state_dir: Option<&'a Path>,
    pub redis_port: Option<u16>,
    pub log_level: &'a str,
    pub ca_file: Option<&'a Path>,
    /// UPSTREAMS_FILE, which takes the place of TARGET_HOST and AUTH_BEARER.
    pub upstreams_file: Option<&'a Path>,
    pub prices_file: Option<&'a Path>,
}

pub fn proxy_env(settings: &Settings, e: &ProxyEnv) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set(
        "PATH",
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
    );
    set(
        "HOME",
        std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
    );
    set("TARGET_HOST", e.upstream_url.to_string());
    set("AUTH_BEARER", UPSTREAM_KEY.to_string());
    set("PROXY_PORT", e.port.to_string());
    set("LOG_LEVEL", e.log_level.to_string());
    set("AUTH_VALIDATION", "true".into());
    set("ALLOWED_TOKENS", CLIENT_TOKEN.into());
    set(
        "MAX_CONCURRENT_REQUESTS",
        settings.max_concurrent_requests().to_string(),
    );
    if let Some(ca) = e.ca_file {
        set("UPSTREAM_CA_FILE", ca.display().to_string());
    }
    if let Some(file) = e.upstreams_file {
        // The proxy refuses to start with both: the file names every upstream and its keys.
        env.remove("TARGET_HOST");
        env.remove("AUTH_BEARER");
        env.insert("UPSTREAMS_FILE".into(), file.display().to_string());
    }
    if let Some(file) = e.prices_file {
        env.insert("PRICES_FILE".into(), file.display().to_string());
    }
    if let Some(file) = e.clients_file {
        // The token moves from ALLOWED_TOKENS into the clients file (one token, one client).
        env.remove("ALLOWED_TOKENS");
        env.insert("CLIENTS_FILE".into(), file.display().to_string());
        if let Some(dir) = e.state_dir {
            env.insert("STATE_DIR".into(), dir.display().to_string());
        }
    }
    if let Some(port) = e.redis_port {
        env.insert("REDIS_URL".into(), format!("redis://127.0.0.1:{port}/0"));
    }
    if settings.workers > 0 {
        env.insert("WORKER_THREADS".into(), settings.workers.to_string());
    }
    // For experiments only (e.g. MALLOC_ARENA_MAX=2, LD_PRELOAD=...): space-separated NAME=VALUE.
    let extra = std::env::var("BENCH_PROXY_ENV").unwrap_or_default();
    for item in extra.split_whitespace() {
        let (name, value) = item.split_once('=').unwrap_or((item, ""));
        if !name.is_empty() {
            env.insert(name.to_string(), value.to_string());
        }
    }
    env
}

fn proxy_log_target(settings: &Settings, path: &Path) -> Result<Stdio, BenchError> {
    if settings.proxy_log == "discard" {
        return Ok(Stdio::null());
    }
    Ok(append(path)?.into())
}

/// The "limited" client: every limit set, none reached by the load (2 x 1000 streams at most,
/// tens of thousands of requests a minute), and a list holding the benchmark's model.
pub const LIMITS: &str = "requests_per_minute = 100000000
tokens_per_minute = 1000000000000
max_concurrent_requests = 100000
tokens_per_day = 1000000000000000
models = [\"gpt-4o-*\"]
";

/// The "priced" client: the limited one with dollar budgets that the load never reaches, so each
/// request reserves its estimated cost before the call and settles the cost of its usage after.
pub const DOLLAR_BUDGETS: &str = "usd_per_day = 1000000
usd_per_month = 10000000
";

/// The "priced" target's PRICES_FILE: the benchmark's model priced as gpt-4o-mini is.
pub const PRICES: &str = "[prices]
\"gpt-4o-*\" = { input = 0.15, cached_input = 0.075, output = 0.60 }
";

/// The "routed" target's upstreams, as (name, tier, weight, models): 30 patterns in all, exact
/// names and trailing-`*` ones. The benchmark's model (gpt-4o-mini) is an exact name of two
/// upstreams of tier 0 weighted 3:1, so every request goes through the weighted choice, and of
/// the tier-1 one behind them.
pub const ROUTED_UPSTREAMS: [(&str, u32, u32, [&str; 10]); 3] = [
    (
        "openai",
        0,
        3,
        [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o1*",
            "o3*",
            "o4-mini*",
            "text-embedding-3-*",
            "whisper-1",
        ],
    ),
    (
        "azure-eu",
        0,
        1,
        [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-*",
            "gpt-35-turbo*",
            "o3-mini",
            "text-embedding-ada-002",
            "dall-e-3",
            "tts-1*",
            "omni-moderation-*",
            "gpt-image-1",
        ],
    ),
    (
        "local",
        1,
        1,
        [
            "gpt-4o-mini",
            "llama-3.1-8b",
            "llama-3.1-70b",
            "llama-3.3-*",
            "qwen2.5-*",
            "mistral-*",
            "mixtral-*",
            "deepseek-*",
            "phi-4*",
            "gemma-2-*",
        ],
    ),
];

/// The "routed" target's aliases (alias, model); the benchmark's requests name no alias.
pub const ROUTED_ALIASES: [(&str, &str); 10] = [
    ("gpt-4", "gpt-4o"),
    ("gpt-4-turbo", "gpt-4o"),
    ("chat", "gpt-4o"),
    ("gpt-3.5-turbo", "gpt-4o-mini"),
    ("fast", "gpt-4o-mini"),
    ("smart", "gpt-4.1"),
    ("reasoning", "o3"),
    ("embed", "text-embedding-3-small"),
    ("llama", "llama-3.1-70b"),
    ("cheap", "llama-3.1-8b"),
];

/// The "routed" target's upstreams file: every upstream is the same mock (`mock_url`, reached
/// through `/v1` as a provider's base URL is), each under its own name, pool and breaker, with
/// its key in `keys_file`.
pub fn upstreams_file_text(mock_url: &str, keys_file: &Path) -> String {
    let quoted = |text: &str| format!("{text:?}");
    let mut text = String::from("default = \"openai\"\n");
    for (name, tier, weight, models) in ROUTED_UPSTREAMS {
        let models: Vec<String> = models.iter().map(|m| quoted(m)).collect();
        text.push_str(&format!(
            "\n[upstreams.{name}]\nbase_url = {}\nkeys_file = {}\nmodels = [{}]\ntier = {tier}\nweight = {weight}\n",
            quoted(&format!("{mock_url}/v1")),
            quoted(&keys_file.display().to_string()),
            models.join(", ")
        ));
    }
    text.push_str("\n[aliases]\n");
    for (alias, model) in ROUTED_ALIASES {
        text.push_str(&format!("{} = {}\n", quoted(alias), quoted(model)));
    }
    text
}

/// Writes the "routed" target's upstreams file and its keys file into `dir` (a directory of its
/// own, as for the clients file: the proxy watches the file's directory); returns the file.
pub fn write_upstreams_file(dir: &Path, mock_url: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{UPSTREAM_KEY}\n"))?;
    let file = dir.join("upstreams.toml");
    std::fs::write(&file, upstreams_file_text(mock_url, &keys))?;
    Ok(file)
}

fn plain_client() -> String {
    format!("[clients.bench]\ntoken = \"{CLIENT_TOKEN}\"\n")
}

/// The clients file of a proxy target, or None for those with ALLOWED_TOKENS.
pub fn clients_file_text(settings: &Settings, name: &str) -> Option<String> {
    match name {
        "limited" | "shared" => Some(plain_client() + LIMITS),
        "priced" => Some(plain_client() + LIMITS + DOLLAR_BUDGETS),
        "clients1" => Some(plain_client()),
        "clients10k" => {
            // The benchmark's client among BENCH_CLIENTS - 1 others with random tokens, in the
            // middle of the file (neither first nor last).
            let others = settings.clients - 1;
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64);
            let mut rng = Rng::new(seed);
            let mut lines = Vec::with_capacity(others + 1);
            for i in 0..others {
                if i == others / 2 {
                    lines.push(plain_client());
                }
                lines.push(format!(
                    "[clients.c{i:05}]\ntoken = \"bench-{:016x}{:02x}\"\n",
                    rng.next_u64(),
                    rng.below(256)
                ));
            }
            Some(lines.join("\n"))
        }
        _ => None,
    }
}

/// The llm-proxy target `name` from `binary`. A twin from the base binary ("base:limited") is
/// configured as its target ("limited") is, with files of its own of the same content: its
/// target is started first and its clients file copied, so that even clients10k's random
/// tokens are the same.
pub fn start_proxy(
    settings: &Settings,
    workdir: &Path,
    upstream: &Proc,
    cpus: Option<&[usize]>,
    name: &str,
    redis: Option<&Proc>,
    binary: &Path,
) -> Result<Proc, BenchError> {
    // A port chosen here rather than PROXY_PORT=0 and the "listening on" line: works whatever
    // the log level and with the log discarded (the race for the port is harmless on loopback).
    let port = port()?;
    let log_path = workdir.join(format!("{name}.log"));
    let mut clients_file = None;
    let mut state_dir = None;
    let twins_file = workdir
        .join(format!("clients-{}", kind(name)))
        .join("clients.toml");
    let clients_text = if is_base(name) && twins_file.exists() {
        Some(
            std::fs::read_to_string(&twins_file)
                .map_err(|e| BenchError::Failed(format!("{}: {e}", twins_file.display())))?,
        )
    } else {
        clients_file_text(settings, kind(name))
    };
    if let Some(text) = clients_text {
        // A directory of its own, as a ConfigMap mount or /etc/llm-proxy is: the proxy watches
        // the file's directory, and with the run's logs in the same one every access line of
        // every target would wake each clients-file proxy's watcher (and charge the writer for
        // those wake-ups).
        let dir = workdir.join(format!("clients-{name}"));
        let file = dir.join("clients.toml");
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&file, text))
            .map_err(|e| BenchError::Failed(format!("{}: {e}", file.display())))?;
        clients_file = Some(file);
        state_dir = Some(workdir.join(format!("{name}-state")));
    }
    let upstreams_file = if kind(name) == "routed" {
        let dir = workdir.join(format!("upstreams-{name}"));
        Some(
            write_upstreams_file(&dir, &upstream.url)
                .map_err(|e| BenchError::Failed(format!("{}: {e}", dir.display())))?,
        )
    } else {
        None
    };
    let prices_file = if kind(name) == "priced" {
        let dir = workdir.join(format!("prices-{name}"));
        let file = dir.join("prices.toml");
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&file, PRICES))
            .map_err(|e| BenchError::Failed(format!("{}: {e}", file.display())))?;
        Some(file)
    } else {
        None
    };
    let env = proxy_env(
        settings,
        &ProxyEnv {
            upstream_url: &upstream.url,
            port,
            clients_file: clients_file.as_deref(),
            state_dir: state_dir.as_deref(),
            redis_port: redis.map(|r| r.port),
            log_level: if kind(name) == "quiet" {
                "error"
            } else {
                "info"
            },
            ca_file: upstream.ca_file.as_deref(),
            upstreams_file: upstreams_file.as_deref(),
            prices_file: prices_file.as_deref(),
        },
    );
    let mut cmd = pinned(binary, cpus);
    cmd.env_clear()
        .envs(env)
        .current_dir(workdir.join("proxy-cwd"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(proxy_log_target(settings, &log_path)?);
    let child = spawn(&mut cmd, "llm-proxy")?;
    let child = listening(
        child,
        port,
        &format!("llm-proxy ({name})"),
        log_path.display(),
    )?;
    let mut proc = Proc::new(name, child, port);
    proc.log_path = (settings.proxy_log != "discard").then_some(log_path);
    if let Some(redis) = redis {
        proc.helpers.push(redis.pid());
    }
    Ok(proc)
}

/// Writes nginx's configuration for one instance; returns its path and the access log's
/// ("off" when BENCH_ACCESS_LOG=off).
fn nginx_conf(
    settings: &Settings,
    paths: &Paths,
    workdir: &Path,
    name: &str,
    port: u16,
    upstream_port: u16,
) -> Result<(PathBuf, String), BenchError> {
    let mut text = std::fs::read_to_string(&paths.nginx_template)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", paths.nginx_template.display())))?;
    let access = if settings.access_log == "off" {
        "off".to_string()
    } else {
        workdir
            .join(format!("nginx-{name}-access.log"))
            .display()
            .to_string()
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let subst = [
        (
            "USER_LINE",
            if root {
                "user root;".to_string()
            } else {
                String::new()
            },
        ),
        ("WORKERS", settings.workers.to_string()),
        ("DIR", workdir.display().to_string()),
        ("ACCESS_LOG", access.clone()),
        ("CLIENT_TOKEN", CLIENT_TOKEN.to_string()),
        ("UPSTREAM_KEY", UPSTREAM_KEY.to_string()),
        ("UPSTREAM_PORT", upstream_port.to_string()),
        ("PORT", port.to_string()),
    ];
    for (key, value) in subst {
        text = text.replace(&format!("@@{key}@@"), &value);
    }
    if text.contains("@@") {
        return Err(BenchError::Failed(
            "nginx template has an unknown placeholder".into(),
        ));
    }
    let path = workdir.join(format!("nginx-{name}.conf"));
    std::fs::write(&path, text)
        .map_err(|e| BenchError::Failed(format!("{}: {e}", path.display())))?;
    Ok((path, access))
}

fn spawn_nginx(
    settings: &Settings,
    paths: &Paths,
    workdir: &Path,
    name: &str,
    port: u16,
    upstream_port: u16,
    cpus: Option<&[usize]>,
) -> Result<(Child, String), BenchError> {
    let (conf, access) = nginx_conf(settings, paths, workdir, name, port, upstream_port)?;
    let mut cmd = pinned(&paths.nginx, cpus);
    cmd.arg("-p")
        .arg(workdir)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(workdir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(append(&workdir.join("nginx.stderr"))?)
        .current_dir(workdir);
    Ok((spawn(&mut cmd, "nginx")?, access))
}

pub fn start_nginx(
    settings: &Settings,
    paths: &Paths,
    workdir: &Path,
    upstream_port: u16,
    cpus: Option<&[usize]>,
) -> Result<Proc, BenchError> {
    let port = port()?;
    let (child, access) =
        spawn_nginx(settings, paths, workdir, "bench", port, upstream_port, cpus)?;
    let child = listening(child, port, "nginx", workdir.join("error.log").display())?;
    let mut proc = Proc::new("nginx", child, port);
    proc.log_path = Some(PathBuf::from(access));
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc.pids().len() < 1 + settings.workers as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(proc)
}

const PROBE: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// The status code of an HTTP/1 response's first bytes.
pub fn status_of(head: &[u8]) -> Option<u16> {
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let code = std::str::from_utf8(rest.get(..3)?).ok()?;
    code.parse().ok()
}

/// One request on a connected socket; returns the status code (our proxies answer 401).
fn probe_on(mut s: TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(PROBE).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    status_of(&buf[..n])
}

/// One request on a fresh connection; returns the status code (our proxies answer 401).
pub fn http_probe(port: u16) -> Option<u16> {
    probe_on(
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5)).ok()?,
    )
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct StartupRun {
    pub connect_ms: f64,
    pub first_response_ms: f64,
    pub status: u16,
    pub idle_rss_kb: u64,
    pub idle_pss_kb: u64,
    pub processes: usize,
    pub threads: u64,
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct Startup {
    pub tries: usize,
    pub connect_ms_median: f64,
    pub first_response_ms_median: f64,
    pub first_response_ms_max: f64,
    pub idle_rss_kb_median: f64,
    pub idle_pss_kb_median: f64,
    pub runs: Vec<StartupRun>,
}

/// Spawn -> first accepted connection (connect() succeeds) and -> first HTTP response, then
/// the idle footprint of the fresh instance; `kind` is "proxy" (the llm-proxy at `proxy`) or
/// "nginx".
pub fn measure_startup(
    settings: &Settings,
    paths: &Paths,
    workdir: &Path,
    kind: &str,
    proxy: &Path,
    upstream: &Proc,
    cpus: Option<&[usize]>,
) -> Result<Startup, BenchError> {
    let mut runs = Vec::new();
    for _ in 0..settings.startup_tries {
        check_interrupted()?;
        let port = port()?;
        let (t0, child) = if kind == "proxy" {
            let env = proxy_env(
                settings,
                &ProxyEnv {
                    upstream_url: &upstream.url,
                    port,
                    clients_file: None,
                    state_dir: None,
                    redis_port: None,
                    log_level: "info",
                    ca_file: None,
                    upstreams_file: None,
                    prices_file: None,
                },
            );
            let mut cmd = pinned(proxy, cpus);
            cmd.env_clear()
                .envs(env)
                .current_dir(workdir.join("proxy-cwd"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(proxy_log_target(
                    settings,
                    &workdir.join("proxy-startup.log"),
                )?);
            let t0 = Instant::now();
            (t0, spawn(&mut cmd, "llm-proxy")?)
        } else {
            // The same command as the benchmarked instance.
            let t0 = Instant::now();
            let (child, _) = spawn_nginx(
                settings,
                paths,
                workdir,
                "startup",
                port,
                upstream.port,
                cpus,
            )?;
            (t0, child)
        };
        let mut proc = Proc::new(kind, child, port);
        let mut connected = None;
        let mut status = None;
        let deadline = t0 + Duration::from_secs(5);
        while Instant::now() < deadline {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    connected = Some(t0.elapsed());
                    status = probe_on(s);
                    break;
                }
                Err(_) => {
                    if !proc.alive() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        let responded = t0.elapsed();
        std::thread::sleep(Duration::from_millis(300)); // let it settle: idle footprint of a fresh instance
        let pids = proc.pids();
        let rss = pids.iter().map(|&p| sys::rss_kb(p)).sum();
        let pss = pids.iter().filter_map(|&p| sys::pss_kb(p)).sum();
        let threads = pids
            .iter()
            .filter_map(|&p| sys::status_kb(p, "Threads"))
            .sum();
        proc.stop();
        let (Some(connected), Some(status)) = (connected, status) else {
            return Err(BenchError::Failed(format!(
                "{kind} did not answer during the start-up measurement"
            )));
        };
        runs.push(StartupRun {
            connect_ms: connected.as_secs_f64() * 1000.0,
            first_response_ms: responded.as_secs_f64() * 1000.0,
            status,
            idle_rss_kb: rss,
            idle_pss_kb: pss,
            processes: pids.len(),
            threads,
        });
    }
    let med = |f: fn(&StartupRun) -> f64| super::stats::median(runs.iter().map(f)).unwrap_or(0.0);
    let round3 = super::stats::round3;
    Ok(Startup {
        tries: settings.startup_tries,
        connect_ms_median: round3(med(|r| r.connect_ms)),
        first_response_ms_median: round3(med(|r| r.first_response_ms)),
        first_response_ms_max: round3(runs.iter().map(|r| r.first_response_ms).fold(0.0, f64::max)),
        idle_rss_kb_median: med(|r| r.idle_rss_kb as f64),
        idle_pss_kb_median: med(|r| r.idle_pss_kb as f64),
        runs,
    })
}

/// Runs a command to its end (stdout and stderr captured), killing it after `timeout`.
pub fn run_captured(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
) -> Result<(i32, String, String), BenchError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd, what)?;
    // Read on threads, so a chatty child never blocks on a full pipe while we wait for it.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        let interrupted = check_interrupted();
        if interrupted.is_err() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            interrupted?;
            return Err(BenchError::Failed(format!(
                "{what} did not finish in {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    Ok((status.code().unwrap_or(-1), out, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    use llm_proxy::config::{UpstreamDefaults, UpstreamsConfig};

    /// The routed target's file as the proxy reads it: what issue 19's bench row asks for.
    #[test]
    fn the_routed_upstreams_file_is_read_by_the_proxy_as_the_bench_means_it() {
        let dir = std::env::temp_dir().join(format!("loadgen-routed-{}", std::process::id()));
        let file = write_upstreams_file(&dir, "http://127.0.0.1:4010").unwrap();
        let loaded = UpstreamsConfig::load(
            &file,
            |_| None,
            UpstreamDefaults {
                connect_timeout: Duration::from_secs(5),
                timeout: Duration::from_secs(60),
                outbound_proxy: false,
            },
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let loaded = loaded.unwrap();

        let names: Vec<&str> = loaded.list.iter().map(|u| &*u.name).collect();
        assert_eq!(names, ["openai", "azure-eu", "local"]);
        assert_eq!(loaded.default_upstream().name.as_ref(), "openai");
        let patterns: usize = loaded.list.iter().map(|u| u.models.iter().count()).sum();
        assert_eq!(patterns, 30);
        let stars = loaded
            .list
            .iter()
            .flat_map(|u| u.models.iter())
            .filter(|p| p.to_string().ends_with('*'))
            .count();
        assert!(
            stars > 0 && stars < 30,
            "exact names and patterns: {stars} with a *"
        );
        assert_eq!(loaded.aliases.len(), 10);
        for upstream in &loaded.list {
            // Every upstream is the bench's mock, reached through /v1, with the one key.
            assert_eq!(
                upstream.settings.base_url.as_str().trim_end_matches('/'),
                "http://127.0.0.1:4010/v1"
            );
            assert_eq!(upstream.settings.keys.len(), 1);
            assert_eq!(
                upstream.keys_file.as_deref(),
                Some(dir.join("keys").as_path())
            );
        }

        // The benchmark's model: two upstreams of the lowest tier, weighted 3:1, so each request
        // is a weighted choice; a third behind them.
        let serving: Vec<(&str, u32, u32)> = loaded
            .list
            .iter()
            .filter(|u| u.models.matches("gpt-4o-mini"))
            .map(|u| (&*u.name, u.tier, u.weight))
            .collect();
        assert_eq!(
            serving,
            [("openai", 0, 3), ("azure-eu", 0, 1), ("local", 1, 1)]
        );
        // No alias names it: the benchmark's requests are routed by their own name.
        assert!(!loaded.aliases.contains_key("gpt-4o-mini"));
    }

    #[test]
    fn the_routed_proxy_has_no_environment_upstream() {
        let settings = super::super::settings::tests::defaults();
        let file = Path::new("/tmp/upstreams.toml");
        let env = proxy_env(
            &settings,
            &ProxyEnv {
                upstream_url: "http://127.0.0.1:4010",
                port: 8080,
                clients_file: None,
                state_dir: None,
                redis_port: None,
                log_level: "info",
                ca_file: None,
                upstreams_file: Some(file),
                prices_file: None,
            },
        );
        // The proxy refuses UPSTREAMS_FILE together with either.
        assert!(!env.contains_key("TARGET_HOST"));
        assert!(!env.contains_key("AUTH_BEARER"));
        assert_eq!(env["UPSTREAMS_FILE"], "/tmp/upstreams.toml");
        assert_eq!(env["ALLOWED_TOKENS"], CLIENT_TOKEN);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_of(b"HTTP/1.1 401 Unauthorized\r\n"), Some(401));
        assert_eq!(status_of(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/2 200\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 "), None);
    }
}
