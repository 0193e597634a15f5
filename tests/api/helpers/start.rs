//! Starting the proxy for a test from one list of settings: in this process on a real listener
//! ([`TestApp`]), or as the real binary in a clean environment ([`RunningProxy`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use llm_proxy::AppState;
use llm_proxy::server::shutdown_channel;
use mock_upstream::MockUpstream;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{ADMIN_TOKEN, CLIENT_TOKEN, TestApp, UPSTREAM_KEY, config_from};

const BINARY: &str = env!("CARGO_BIN_EXE_llm-proxy");

/// What most tests run with: the upstream key, validation on with `CLIENT_TOKEN`, an admin token.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("AUTH_BEARER", UPSTREAM_KEY),
    ("AUTH_VALIDATION", "true"),
    ("ALLOWED_TOKENS", CLIENT_TOKEN),
    ("ADMIN_TOKEN", ADMIN_TOKEN),
];

/// How long the binary may take to say it listens: a cold start on a loaded machine.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A proxy to start: its settings in the order given (a later one wins), the mock it owns, and
/// for the binary where it runs.
#[derive(Default)]
pub struct Proxy {
    vars: Vec<(String, String)>,
    upstream: Option<MockUpstream>,
    dir: Option<PathBuf>,
    file_limit: Option<(u64, u64)>,
}

impl Proxy {
    /// No settings at all: the test names each one.
    pub fn new() -> Proxy {
        Proxy::default()
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Proxy {
        self.vars.push((name.to_string(), value.into()));
        self
    }

    pub fn envs(self, vars: &[(&str, &str)]) -> Proxy {
        vars.iter()
            .fold(self, |proxy, (name, value)| proxy.env(name, *value))
    }

    /// In front of `upstream` (`TARGET_HOST`), which lives as long as the proxy.
    pub fn upstream(self, upstream: MockUpstream) -> Proxy {
        let target = upstream.base_url();
        self.owning(upstream).env("TARGET_HOST", target)
    }

    /// Keeps `upstream` for as long as the proxy, the settings naming how it is reached.
    pub fn owning(mut self, upstream: MockUpstream) -> Proxy {
        self.upstream = Some(upstream);
        self
    }

    /// `CLIENTS_FILE` = `file`.
    pub fn clients_file(self, file: &Path) -> Proxy {
        self.env("CLIENTS_FILE", file.to_str().expect("a UTF-8 path"))
    }

    /// The directory the binary runs in, where it reads `.env` files (else an empty one).
    pub fn in_dir(mut self, dir: &Path) -> Proxy {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// The binary's open-file limits, set before it runs.
    pub fn file_limit(mut self, soft: u64, hard: u64) -> Proxy {
        self.file_limit = Some((soft, hard));
        self
    }

    fn settings(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect()
    }

    /// The proxy in this process on 127.0.0.1:0, serving before this returns. Without an
    /// upstream of its own it gets a fresh mock that the settings may or may not name.
    pub async fn start_in_process(self) -> TestApp {
        let state = AppState::new(config_from(&self.settings()));
        let upstream = match self.upstream {
            Some(upstream) => upstream,
            None => MockUpstream::start().await,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, signal) = shutdown_channel();
        let server = tokio::spawn(llm_proxy::serve(listener, state.clone(), signal));
        TestApp {
            addr,
            state,
            upstream,
            client: reqwest::Client::new(),
            shutdown,
            server: Some(server),
        }
    }

    /// The binary run to its end with `args` and only these settings (no `PROXY_PORT` added):
    /// a command, or a start-up that is meant to fail.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(BINARY)
            .args(args)
            .env_clear()
            .envs(self.settings())
            .current_dir(self.dir.clone().unwrap_or_else(std::env::temp_dir))
            .stdin(Stdio::null())
            .output()
            .expect("the binary runs")
    }

    /// The binary with only these settings and `PROXY_PORT=0` under them, once its log says
    /// where it listens; its log lines are collected, and it is killed when dropped.
    pub async fn start_binary(self) -> RunningProxy {
        let mut command = tokio::process::Command::new(BINARY);
        if let Some((soft, hard)) = self.file_limit {
            // SAFETY: setrlimit is async-signal-safe and touches nothing shared with the parent.
            unsafe {
                command.pre_exec(move || {
                    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard)?;
                    Ok(())
                });
            }
        }
        let dir = self.dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut child = command
            .env_clear()
            .env("PROXY_PORT", "0")
            .envs(self.settings())
            .current_dir(dir)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let (sender, log) = tokio::sync::mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = sender.send(line);
            }
        });
        let mut proxy = RunningProxy {
            child,
            port: 0,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            startup_log: String::new(),
            log,
            _upstream: self.upstream,
        };
        let mut startup_log = String::new();
        let listening = proxy
            .read_log_until(START_LIMIT, |line| {
                startup_log.push_str(line);
                startup_log.push('\n');
                line.contains("listening on ")
            })
            .await
            .unwrap_or_else(|| panic!("the proxy did not start listening:\n{startup_log}"));
        let (_, rest) = listening.split_once("listening on ").unwrap_or_default();
        // The address ends where the line, a JSON string or a colour code does.
        let address: String = rest
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        proxy.addr = address.parse().expect("an address after \"listening on\"");
        proxy.port = proxy.addr.port();
        proxy.startup_log = startup_log;
        proxy
    }
}

/// The binary, started by [`Proxy::start_binary`].
pub struct RunningProxy {
    pub child: tokio::process::Child,
    pub port: u16,
    /// Where it listens, as its log says.
    pub addr: SocketAddr,
    /// The lines up to and including "listening on".
    pub startup_log: String,
    pub log: UnboundedReceiver<String>,
    _upstream: Option<MockUpstream>,
}

impl RunningProxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The `usage` of client `name` in `/admin/clients` (read with `ADMIN_TOKEN`); null when the
    /// client is not listed.
    pub async fn admin_usage(&self, name: &str) -> serde_json::Value {
        super::admin_client(&self.url(""), name)
            .await
            .map(|client| client["usage"].clone())
            .unwrap_or_default()
    }

    /// Sends `signal` (`-TERM`, `-HUP`, `-KILL`...) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the proxy is running").to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// The next log line containing every one of `wanted`, within `limit`; the lines before
    /// it are consumed.
    pub async fn log_line_with(&mut self, wanted: &[&str], limit: Duration) -> Option<String> {
        self.read_log_until(limit, |line| wanted.iter().all(|part| line.contains(part)))
            .await
    }

    /// Reads log lines as they come until `found` says one is it; `None` when the process
    /// ended or `limit` passed first.
    async fn read_log_until(
        &mut self,
        limit: Duration,
        mut found: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let log = &mut self.log;
        let read = async {
            while let Some(line) = log.recv().await {
                if found(&line) {
                    return Some(line);
                }
            }
            None
        };
        tokio::time::timeout(limit, read).await.ok().flatten()
    }
}

/// The log lines received so far, each ending in a newline.
pub fn drain(log: &mut UnboundedReceiver<String>) -> String {
    let mut all = String::new();
    while let Ok(line) = log.try_recv() {
        all.push_str(&line);
        all.push('\n');
    }
    all
}
