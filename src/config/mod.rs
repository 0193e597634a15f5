//! Configuration from the environment, then `.env.local`, then `.env` (the real environment wins):
//! loaded, validated and parsed once, so that what is built from it cannot fail.
//!
//! Loading and validation are separate from the process environment (`Config::from_lookup`) so tests
//! can build any configuration without touching global state.

pub mod clients;
mod redis;
mod secret;
mod values;
pub mod variables;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use warp::http::{HeaderName, HeaderValue};

use crate::auth::token_label;
use crate::error::ErrorFormat;
pub use clients::{Client, ClientLimits};
pub use redis::{RedisUrl, SharedStateConfig};
pub use secret::Secret;
use values::invalid;
pub use values::{UpstreamQuery, is_client_name};

pub const DEFAULT_TARGET_HOST: &str = "https://api.example.com";
pub const DEFAULT_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Error,
}

impl LogLevel {
    pub fn as_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Error => log::LevelFilter::Error,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub upstream: UpstreamConfig,
    /// `PROXY_HOST`: `0.0.0.0` (all IPv4 interfaces), `::` (IPv4 and IPv6), or one address.
    pub host: IpAddr,
    pub port: u16,
    pub log_level: LogLevel,
    pub debug_mode: bool,
    pub log_format: LogFormat,
    /// `ERROR_FORMAT`: the body of the proxy's own error answers.
    pub error_format: ErrorFormat,
    pub auth_validation: bool,
    /// The header callers put their token in (`DEFAULT_AUTH_HEADER`).
    pub auth_header: HeaderName,
    pub allowed_tokens: Vec<ClientToken>,
    /// `CLIENTS_FILE`, read again on reload.
    pub clients_file: Option<PathBuf>,
    /// Every known caller: the `ALLOWED_TOKENS` entries (no limits), then the clients file's.
    pub clients: Vec<Client>,
    /// `STATE_DIR`: where the daily budgets are kept across restarts.
    pub state_dir: PathBuf,
    pub admin_token: Option<Secret>,
    /// Protects `/metrics`; falls back to `admin_token`, and `/metrics` is open without either.
    pub metrics_token: Option<Secret>,
    pub limits: Limits,
    /// `REDIS_URL` and its companions: state shared by replicas.
    pub shared: SharedStateConfig,
    /// `WORKER_THREADS`: the runtime's worker threads; `None`: one per core the process may use.
    pub worker_threads: Option<usize>,
}

/// Where requests go and with which keys, parsed once.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// What the caller's `/v1` is replaced by, without a trailing slash: `TARGET_HOST` + `/v1`,
    /// or `TARGET_BASE_URL` as it is (the meaning the OpenAI SDKs give `base_url`).
    pub base_url: Url,
    /// `AUTH_BEARER`: one key, or a pool of keys used in turn, in the order given.
    pub keys: Vec<UpstreamKey>,
    /// `UPSTREAM_AUTH_HEADER`: the header the key goes in.
    pub auth_header: HeaderName,
    /// `UPSTREAM_QUERY`: parameters added to every upstream request.
    pub query: Option<UpstreamQuery>,
    /// The connection pools (`UPSTREAM_HTTP2_CONNECTIONS` of them, requests taking them in turn),
    /// built here because their TLS and timeout settings are configuration: whatever fails about
    /// them fails at start-up, naming the variable. Never empty.
    pub clients: Vec<reqwest::Client>,
    /// HTTP/1.1 only: a WebSocket upgrade cannot ride on an HTTP/2 connection that ALPN may
    /// pick for the pool above.
    pub tunnel_client: reqwest::Client,
}

/// One upstream key and the header value it is sent as.
#[derive(Clone)]
pub struct UpstreamKey {
    pub key: Secret,
    /// `Bearer <key>` for `Authorization`, else the bare key; marked sensitive so hyper never
    /// logs or indexes it.
    pub header_value: HeaderValue,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url.as_str())
            .field("keys", &self.keys.len())
            .field("auth_header", &self.auth_header)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// One `ALLOWED_TOKENS` entry: `token`, or `name:token` to give the client a readable label in
/// metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientToken {
    pub name: Option<String>,
    pub token: Secret,
}

impl ClientToken {
    fn parse(entry: &str) -> ClientToken {
        match entry.split_once(':') {
            Some((name, token)) if is_client_name(name) && !token.trim().is_empty() => {
                ClientToken {
                    name: Some(name.to_string()),
                    token: Secret::new(token.trim()),
                }
            }
            _ => ClientToken {
                name: None,
                token: Secret::new(entry),
            },
        }
    }

    /// The name, or a short hash of the token for an unnamed entry.
    pub fn label(&self) -> Arc<str> {
        match &self.name {
            Some(name) => Arc::from(name.as_str()),
            None => Arc::from(token_label(&self.token)),
        }
    }
}

/// Timeouts and size limits: what keeps one bad peer from holding the proxy's resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub upstream_connect_timeout: Duration,
    /// From sending the request to the upstream's response headers.
    pub upstream_timeout: Duration,
    /// Longest silence between two chunks of an upstream body.
    pub stream_idle_timeout: Duration,
    /// How long a client has to send its request headers; also how long an idle keep-alive
    /// connection is kept, since hyper starts the same clock while waiting for the next request.
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_body_bytes: u64,
    pub max_concurrent_requests: usize,
    /// `SSE_KEEPALIVE_SECS`: silence after which a comment line goes to an SSE client (`None`: off).
    pub sse_keepalive: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            max_body_bytes: 32 * 1024 * 1024,
            max_concurrent_requests: 1024,
            sse_keepalive: None,
        }
    }
}

/// A configuration problem, always naming the variable so the operator knows what to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The variables of `.env` and `.env.local` in the working directory, `.env.local` winning.
pub fn env_files() -> Result<HashMap<String, String>, ConfigError> {
    let mut files = HashMap::new();
    // `.env` first so that `.env.local` overrides it; the real environment overrides both.
    for file in [".env", ".env.local"] {
        files.extend(values::env_file(Path::new(file))?);
    }
    Ok(files)
}

/// A variable from the process environment, else from the files.
pub fn lookup_in(files: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    |name| {
        std::env::var(name)
            .ok()
            .or_else(|| files.get(name).cloned())
    }
}

/// Values trimmed; an empty value means "not set": `docker run -e ADMIN_TOKEN=` should not
/// enable anything.
pub fn non_empty(lookup: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |name| {
        lookup(name)
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
    }
}

/// `PROXY_HOST` and `PROXY_PORT`, read on their own by `healthcheck`, which must not need the
/// rest of the configuration.
pub fn listen_address(get: &impl Fn(&str) -> Option<String>) -> Result<SocketAddr, ConfigError> {
    let host = match get("PROXY_HOST") {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(value) => value.parse::<IpAddr>().map_err(|_| {
            invalid(
                "PROXY_HOST",
                format!(
                    "{value:?} is not an IP address (accepted: 0.0.0.0, ::, 127.0.0.1, ::1, \
                     or one address of this machine)"
                ),
            )
        })?,
    };
    let port = match get("PROXY_PORT") {
        None => DEFAULT_PORT,
        Some(value) => value.parse::<u16>().map_err(|_| {
            invalid(
                "PROXY_PORT",
                format!("{value:?} is not a port number (accepted: 0-65535)"),
            )
        })?,
    };
    Ok(SocketAddr::new(host, port))
}

impl Config {
    /// Reads the process environment, then `.env.local`, then `.env` in the working directory.
    pub fn load() -> Result<Config, ConfigError> {
        let files = env_files()?;
        Config::from_lookup(lookup_in(&files))
    }

    /// Builds and validates a configuration from any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = non_empty(lookup);

        let base_url = match (get("TARGET_HOST"), get("TARGET_BASE_URL")) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "TARGET_BASE_URL",
                    "cannot be set together with TARGET_HOST: set TARGET_BASE_URL to the base URL \
                     your provider documents (the client's /v1/<rest> goes to \
                     TARGET_BASE_URL/<rest>), or TARGET_HOST to a host whose API is under /v1",
                ));
            }
            (None, Some(base)) => values::upstream_base(
                "TARGET_BASE_URL",
                &base,
                "https://api.openai.com/v1 or https://open.bigmodel.cn/api/paas/v4",
            )?,
            (host, None) => {
                let mut url = values::upstream_base(
                    "TARGET_HOST",
                    host.as_deref().unwrap_or(DEFAULT_TARGET_HOST),
                    "https://api.openai.com or https://host/openai",
                )?;
                let path = format!("{}/v1", url.path().trim_end_matches('/'));
                url.set_path(&path);
                url
            }
        };

        let auth_header_upstream = match get("UPSTREAM_AUTH_HEADER") {
            None => warp::http::header::AUTHORIZATION,
            Some(name) => values::header_name("UPSTREAM_AUTH_HEADER", &name)?,
        };
        let keys = upstream_keys(get("AUTH_BEARER"), &auth_header_upstream)?;
        let query = values::upstream_query(get("UPSTREAM_QUERY"))?;

        let listen = listen_address(&get)?;

        let log_level = match get("LOG_LEVEL").map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("info") => LogLevel::Info,
            Some("debug") => LogLevel::Debug,
            Some("error") => LogLevel::Error,
            Some(other) => {
                return Err(invalid(
                    "LOG_LEVEL",
                    format!("{other:?} is not a log level (accepted: debug, info, error)"),
                ));
            }
        };

        let debug_mode = values::boolean("DEBUG_MODE", get("DEBUG_MODE"))?;
        let clients_file = get("CLIENTS_FILE").map(PathBuf::from);
        // A clients file is a list of who may call: it makes no sense with validation off, and
        // silently ignoring it would leave the proxy open.
        let auth_validation = match (get("AUTH_VALIDATION"), &clients_file) {
            (None, Some(_)) => true,
            (value, Some(_)) if !values::boolean("AUTH_VALIDATION", value.clone())? => {
                return Err(invalid(
                    "AUTH_VALIDATION",
                    "is false but CLIENTS_FILE is set: a clients file turns validation on; \
                     remove one of the two",
                ));
            }
            (value, _) => values::boolean("AUTH_VALIDATION", value)?,
        };

        let allowed_tokens: Vec<ClientToken> = get("ALLOWED_TOKENS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(ClientToken::parse)
            .collect();
        if auth_validation && allowed_tokens.is_empty() && clients_file.is_none() {
            return Err(invalid(
                "ALLOWED_TOKENS",
                "is empty but AUTH_VALIDATION is on: list the client tokens, comma-separated, \
                 or set AUTH_VALIDATION=false",
            ));
        }
        let mut clients: Vec<Client> = allowed_tokens
            .iter()
            .map(Client::from_allowed_token)
            .collect();
        if let Some(path) = &clients_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                invalid(
                    "CLIENTS_FILE",
                    format!("{} cannot be read: {err}", path.display()),
                )
            })?;
            let from_file = clients::parse(&text).map_err(|message| {
                invalid("CLIENTS_FILE", format!("{}: {message}", path.display()))
            })?;
            for client in &from_file {
                // One name is one set of counters: an ALLOWED_TOKENS entry of the same name
                // would share (and spend) the file client's limits.
                if clients.iter().any(|known| known.name == client.name) {
                    return Err(invalid(
                        "CLIENTS_FILE",
                        format!(
                            "{}: clients.{}: the same name as an ALLOWED_TOKENS entry",
                            path.display(),
                            client.name
                        ),
                    ));
                }
                if clients.iter().any(|known| known.digest == client.digest) {
                    return Err(invalid(
                        "CLIENTS_FILE",
                        format!(
                            "{}: clients.{}.token: the same token as an ALLOWED_TOKENS entry",
                            path.display(),
                            client.name
                        ),
                    ));
                }
            }
            clients.extend(from_file);
        }
        let state_dir = PathBuf::from(get("STATE_DIR").unwrap_or_else(|| "state".to_string()));

        let auth_header = match get("DEFAULT_AUTH_HEADER") {
            None => warp::http::header::AUTHORIZATION,
            Some(name) => values::header_name("DEFAULT_AUTH_HEADER", &name)?,
        };

        let admin_token = get("ADMIN_TOKEN").map(Secret::new);
        let metrics_token = get("METRICS_TOKEN").map(Secret::new);

        let log_format = match get("LOG_FORMAT").map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "LOG_FORMAT",
                    format!("{other:?} is not a log format (accepted: text, json)"),
                ));
            }
        };

        let error_format = match get("ERROR_FORMAT") {
            None => ErrorFormat::default(),
            Some(value) => ErrorFormat::parse(value.trim()).ok_or_else(|| {
                invalid(
                    "ERROR_FORMAT",
                    format!(
                        "{value:?} is not an error format (accepted: {})",
                        ErrorFormat::ACCEPTED
                    ),
                )
            })?,
        };

        let defaults = Limits::default();
        let seconds = |name: &str, default: Duration| {
            values::positive(name, get(name), default.as_secs()).map(Duration::from_secs)
        };
        let limits = Limits {
            upstream_connect_timeout: seconds(
                "UPSTREAM_CONNECT_TIMEOUT_SECS",
                defaults.upstream_connect_timeout,
            )?,
            upstream_timeout: seconds("UPSTREAM_TIMEOUT_SECS", defaults.upstream_timeout)?,
            stream_idle_timeout: seconds("STREAM_IDLE_TIMEOUT_SECS", defaults.stream_idle_timeout)?,
            header_read_timeout: seconds("HEADER_READ_TIMEOUT_SECS", defaults.header_read_timeout)?,
            shutdown_grace: seconds("SHUTDOWN_GRACE_SECS", defaults.shutdown_grace)?,
            max_body_bytes: values::positive(
                "MAX_BODY_BYTES",
                get("MAX_BODY_BYTES"),
                defaults.max_body_bytes,
            )?,
            max_concurrent_requests: values::positive(
                "MAX_CONCURRENT_REQUESTS",
                get("MAX_CONCURRENT_REQUESTS"),
                defaults.max_concurrent_requests as u64,
            )?
            .try_into()
            .map_err(|_| invalid("MAX_CONCURRENT_REQUESTS", "is too large"))?,
            sse_keepalive: values::seconds_or_off("SSE_KEEPALIVE_SECS", get("SSE_KEEPALIVE_SECS"))?,
        };

        let worker_threads = values::worker_threads(get("WORKER_THREADS"))?;

        let extra_roots = match get("UPSTREAM_CA_FILE") {
            None => Vec::new(),
            Some(path) => values::ca_file(&path)?,
        };
        let shared = redis::shared_state(&get)?;
        let connections = values::positive(
            "UPSTREAM_HTTP2_CONNECTIONS",
            get("UPSTREAM_HTTP2_CONNECTIONS"),
            1,
        )?;
        if connections > MAX_UPSTREAM_CONNECTIONS {
            return Err(invalid(
                "UPSTREAM_HTTP2_CONNECTIONS",
                format!("is more than {MAX_UPSTREAM_CONNECTIONS}"),
            ));
        }
        // One pool each: hyper's client puts every request to a host on its one HTTP/2
        // connection, and queues those beyond the provider's stream limit rather than opening
        // another.
        let pools = (0..connections)
            .map(|_| http_client(&limits, &extra_roots, Protocols::Negotiated))
            .collect::<Result<Vec<_>, _>>()?;
        let tunnel_client = http_client(&limits, &extra_roots, Protocols::Http1Only)?;

        Ok(Config {
            upstream: UpstreamConfig {
                base_url,
                keys,
                auth_header: auth_header_upstream,
                query,
                clients: pools,
                tunnel_client,
            },
            host: listen.ip(),
            port: listen.port(),
            log_level,
            debug_mode,
            log_format,
            error_format,
            auth_validation,
            auth_header,
            allowed_tokens,
            clients_file,
            clients,
            state_dir,
            admin_token,
            metrics_token,
            limits,
            shared,
            worker_threads,
        })
    }

    /// Every secret the configuration holds, for redaction.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.upstream
            .keys
            .iter()
            .map(|key| &key.key)
            .chain(
                self.clients
                    .iter()
                    .filter_map(|client| client.token.as_ref()),
            )
            .chain(&self.admin_token)
            .chain(&self.metrics_token)
            .chain(
                self.shared
                    .redis
                    .iter()
                    .flat_map(|redis| std::iter::once(&redis.url).chain(&redis.password)),
            )
    }

    /// The settings a reload cannot change, each as its variable and a fingerprint that holds
    /// no secret: a reload compares them and logs the ones that need a restart. (`CLIENTS_FILE`
    /// too, which the reload handles itself: it keeps reading the file it watches.)
    pub fn restart_only(&self) -> Vec<(&'static str, String)> {
        let limits = &self.limits;
        vec![
            (
                "TARGET_HOST / TARGET_BASE_URL",
                self.upstream.base_url.to_string(),
            ),
            (
                "AUTH_BEARER",
                self.upstream
                    .keys
                    .iter()
                    .map(|key| token_label(&key.key))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "UPSTREAM_AUTH_HEADER",
                self.upstream.auth_header.to_string(),
            ),
            (
                "UPSTREAM_QUERY",
                self.upstream.query.as_ref().map_or(String::new(), |query| {
                    token_label(&Secret::new(query.encoded.clone()))
                }),
            ),
            ("SSE_KEEPALIVE_SECS", format!("{:?}", limits.sse_keepalive)),
            ("PROXY_HOST", self.host.to_string()),
            ("PROXY_PORT", self.port.to_string()),
            ("LOG_LEVEL", format!("{:?}", self.log_level)),
            ("LOG_FORMAT", format!("{:?}", self.log_format)),
            ("ERROR_FORMAT", format!("{:?}", self.error_format)),
            ("DEBUG_MODE", self.debug_mode.to_string()),
            ("WORKER_THREADS", format!("{:?}", self.worker_threads)),
            ("DEFAULT_AUTH_HEADER", self.auth_header.to_string()),
            ("STATE_DIR", self.state_dir.display().to_string()),
            (
                "UPSTREAM_CONNECT_TIMEOUT_SECS",
                format!("{:?}", limits.upstream_connect_timeout),
            ),
            (
                "UPSTREAM_TIMEOUT_SECS",
                format!("{:?}", limits.upstream_timeout),
            ),
            (
                "STREAM_IDLE_TIMEOUT_SECS",
                format!("{:?}", limits.stream_idle_timeout),
            ),
            (
                "HEADER_READ_TIMEOUT_SECS",
                format!("{:?}", limits.header_read_timeout),
            ),
            (
                "SHUTDOWN_GRACE_SECS",
                format!("{:?}", limits.shutdown_grace),
            ),
            ("MAX_BODY_BYTES", limits.max_body_bytes.to_string()),
            (
                "MAX_CONCURRENT_REQUESTS",
                limits.max_concurrent_requests.to_string(),
            ),
        ]
    }
}

/// `AUTH_BEARER`: keys separated by commas, trimmed, at least one, each sendable in a header.
fn upstream_keys(
    value: Option<String>,
    header: &HeaderName,
) -> Result<Vec<UpstreamKey>, ConfigError> {
    let value = value.ok_or_else(|| {
        invalid(
            "AUTH_BEARER",
            "is required: set it to the upstream API key, or several keys separated by commas",
        )
    })?;
    let bearer = header == warp::http::header::AUTHORIZATION;
    let mut keys = Vec::new();
    for (index, key) in value.split(',').map(str::trim).enumerate() {
        let position = index + 1;
        if key.is_empty() {
            return Err(invalid(
                "AUTH_BEARER",
                format!("key {position} is empty: separate keys by single commas"),
            ));
        }
        let text = if bearer {
            format!("Bearer {key}")
        } else {
            key.to_string()
        };
        // The key is not echoed, only its position.
        let mut header_value = HeaderValue::from_str(&text).map_err(|_| {
            invalid(
                "AUTH_BEARER",
                format!("key {position} contains characters that cannot be sent in an HTTP header"),
            )
        })?;
        header_value.set_sensitive(true);
        keys.push(UpstreamKey {
            key: Secret::new(key),
            header_value,
        });
    }
    Ok(keys)
}

/// `UPSTREAM_HTTP2_CONNECTIONS` at most: each pool loads its own TLS roots.
const MAX_UPSTREAM_CONNECTIONS: u64 = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocols {
    Negotiated,
    Http1Only,
}

fn http_client(
    limits: &Limits,
    extra_roots: &[reqwest::Certificate],
    protocols: Protocols,
) -> Result<reqwest::Client, ConfigError> {
    let from_file = !extra_roots.is_empty();
    let mut builder = reqwest::Client::builder();
    // Without a proxy variable, reqwest would still run its system-proxy matcher on every
    // request (twice); with one, it reads them as before.
    if !values::proxy_variable_set(|name| std::env::var_os(name).is_some()) {
        builder = builder.no_proxy();
    }
    if protocols == Protocols::Http1Only {
        builder = builder.http1_only();
    }
    // Trusted: the compiled-in Mozilla roots, the machine's store where it has one (read by
    // rustls-native-certs, which honours SSL_CERT_FILE and SSL_CERT_DIR), and UPSTREAM_CA_FILE.
    for certificate in extra_roots {
        builder = builder.add_root_certificate(certificate.clone());
    }
    builder
        // A followed redirect would send the upstream key wherever `Location` points.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(limits.upstream_connect_timeout)
        .tcp_nodelay(true)
        // Enough warm connections for a burst; without a cap every connection of a peak (one
        // per concurrent stream) would stay open, buffers and all, for the idle timeout.
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|err| {
            invalid(
                if from_file {
                    "UPSTREAM_CA_FILE"
                } else {
                    "TARGET_HOST"
                },
                format!("no HTTP client can be built for the upstream: {err}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    fn error_variable(vars: &[(&str, &str)]) -> String {
        config(vars)
            .expect_err("configuration should be rejected")
            .variable
    }

    #[test]
    fn upstream_http2_connections_is_one_to_sixty_four() {
        let pools = |value: &str| {
            config(&[("AUTH_BEARER", "k"), ("UPSTREAM_HTTP2_CONNECTIONS", value)])
                .map(|config| config.upstream.clients.len())
        };
        assert_eq!(pools("3").unwrap(), 3);
        assert_eq!(pools("64").unwrap(), 64);
        for bad in ["0", "65", "two"] {
            assert_eq!(
                pools(bad).err().map(|err| err.variable),
                Some("UPSTREAM_HTTP2_CONNECTIONS".to_string()),
                "{bad}"
            );
        }
        let default = config(&[("AUTH_BEARER", "k")]).unwrap();
        assert_eq!(default.upstream.clients.len(), 1);
    }

    #[test]
    fn defaults_match_the_documented_contract() {
        let config = config(&[("AUTH_BEARER", "sk-upstream")]).unwrap();
        assert_eq!(
            config.upstream.base_url.as_str(),
            "https://api.example.com/v1"
        );
        assert_eq!(config.upstream.auth_header, "authorization");
        assert_eq!(config.upstream.keys.len(), 1);
        assert!(config.upstream.query.is_none());
        assert_eq!(config.limits.sse_keepalive, None);
        assert_eq!(config.port, 8080);
        assert_eq!(config.log_level, LogLevel::Info);
        assert!(!config.debug_mode);
        assert!(!config.auth_validation);
        assert!(config.allowed_tokens.is_empty());
        assert_eq!(config.auth_header, "authorization");
        assert!(config.admin_token.is_none());
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.max_body_bytes, 33_554_432);
        assert_eq!(config.limits.max_concurrent_requests, 1024);
        assert_eq!(config.limits.upstream_timeout, Duration::from_secs(600));
    }

    #[test]
    fn worker_threads_default_to_the_cores_and_are_bounded() {
        let base = [("AUTH_BEARER", "sk-upstream")];
        assert_eq!(config(&base).unwrap().worker_threads, None);
        let with = |value: &str| config(&[base[0], ("WORKER_THREADS", value)]);
        assert_eq!(with("1").unwrap().worker_threads, Some(1));
        assert_eq!(with("1024").unwrap().worker_threads, Some(1024));
        for bad in ["0", "1025", "two", "-1"] {
            assert_eq!(with(bad).unwrap_err().variable, "WORKER_THREADS", "{bad}");
        }
    }

    #[test]
    fn any_proxy_variable_in_either_case_counts() {
        assert!(!values::proxy_variable_set(|_| false));
        for name in ["HTTPS_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            assert!(values::proxy_variable_set(|seen| seen == name), "{name}");
        }
        assert!(!values::proxy_variable_set(|seen| seen == "NO_PROXY"));
    }

    #[test]
    fn limits_are_read_and_must_be_positive() {
        let config = config(&[
            ("AUTH_BEARER", "k"),
            ("STREAM_IDLE_TIMEOUT_SECS", "7"),
            ("MAX_BODY_BYTES", "1024"),
        ])
        .unwrap();
        assert_eq!(config.limits.stream_idle_timeout, Duration::from_secs(7));
        assert_eq!(config.limits.max_body_bytes, 1024);
        for variable in [
            "UPSTREAM_CONNECT_TIMEOUT_SECS",
            "UPSTREAM_TIMEOUT_SECS",
            "STREAM_IDLE_TIMEOUT_SECS",
            "HEADER_READ_TIMEOUT_SECS",
            "SHUTDOWN_GRACE_SECS",
            "MAX_BODY_BYTES",
            "MAX_CONCURRENT_REQUESTS",
        ] {
            for bad in ["0", "-1", "ten", "1.5"] {
                assert_eq!(
                    error_variable(&[("AUTH_BEARER", "k"), (variable, bad)]),
                    variable
                );
            }
        }
    }

    #[test]
    fn allowed_tokens_are_split_and_trimmed() {
        let config = config(&[
            ("AUTH_BEARER", "k"),
            ("AUTH_VALIDATION", "true"),
            ("ALLOWED_TOKENS", " a , b,,c "),
        ])
        .unwrap();
        let tokens: Vec<&str> = config
            .allowed_tokens
            .iter()
            .map(|client| client.token.expose())
            .collect();
        assert_eq!(tokens, ["a", "b", "c"]);
    }

    #[test]
    fn allowed_tokens_may_carry_a_client_name() {
        let config = config(&[
            ("AUTH_BEARER", "k"),
            ("ALLOWED_TOKENS", "alice: sk-a ,sk-plain, bad name:tok,:x"),
        ])
        .unwrap();
        let entries: Vec<(Option<&str>, &str)> = config
            .allowed_tokens
            .iter()
            .map(|client| (client.name.as_deref(), client.token.expose()))
            .collect();
        assert_eq!(
            entries,
            [
                (Some("alice"), "sk-a"),
                (None, "sk-plain"),
                (None, "bad name:tok"),
                (None, ":x")
            ]
        );
    }

    #[test]
    fn target_host_keeps_its_path_prefix_without_trailing_slash() {
        let config = config(&[
            ("AUTH_BEARER", "k"),
            ("TARGET_HOST", "http://127.0.0.1:9000/openai/"),
        ])
        .unwrap();
        assert_eq!(
            config.upstream.base_url.as_str(),
            "http://127.0.0.1:9000/openai/v1"
        );
    }

    #[test]
    fn target_base_url_is_taken_verbatim_and_excludes_target_host() {
        let glm = config(&[
            ("AUTH_BEARER", "k"),
            ("TARGET_BASE_URL", "https://open.bigmodel.cn/api/paas/v4/"),
        ])
        .unwrap();
        assert_eq!(
            glm.upstream.base_url.as_str(),
            "https://open.bigmodel.cn/api/paas/v4"
        );
        let both = config(&[
            ("AUTH_BEARER", "k"),
            ("TARGET_HOST", "https://a"),
            ("TARGET_BASE_URL", "https://b/v1"),
        ])
        .unwrap_err();
        assert_eq!(both.variable, "TARGET_BASE_URL");
        assert!(both.to_string().contains("TARGET_HOST"), "{both}");
        for variable in ["TARGET_HOST", "TARGET_BASE_URL"] {
            let err = config(&[
                ("AUTH_BEARER", "k"),
                (variable, "https://h/v1?api-version=1"),
            ])
            .unwrap_err();
            assert_eq!(err.variable, variable);
            assert!(err.message.contains("UPSTREAM_QUERY"), "{err}");
        }
    }

    #[test]
    fn upstream_keys_form_a_pool_sent_in_the_configured_header() {
        let pool = config(&[("AUTH_BEARER", " k1 , k2,k3 ")]).unwrap();
        let values: Vec<&[u8]> = pool
            .upstream
            .keys
            .iter()
            .map(|key| key.header_value.as_bytes())
            .collect();
        assert_eq!(values, [&b"Bearer k1"[..], b"Bearer k2", b"Bearer k3"]);
        assert!(
            pool.upstream
                .keys
                .iter()
                .all(|key| key.header_value.is_sensitive())
        );
        let azure = config(&[("AUTH_BEARER", "k1"), ("UPSTREAM_AUTH_HEADER", "api-key")]).unwrap();
        assert_eq!(azure.upstream.auth_header, "api-key");
        assert_eq!(azure.upstream.keys[0].header_value, "k1");
        let empty = config(&[("AUTH_BEARER", "k1,,k3")]).unwrap_err();
        assert_eq!(empty.variable, "AUTH_BEARER");
        assert!(empty.message.contains("key 2"), "{empty}");
        let bad = config(&[("AUTH_BEARER", "good,bad\u{7f}key")]).unwrap_err();
        assert!(!bad.to_string().contains("bad"), "{bad}");
        assert_eq!(
            error_variable(&[("AUTH_BEARER", "k"), ("UPSTREAM_AUTH_HEADER", "bad header")]),
            "UPSTREAM_AUTH_HEADER"
        );
        assert_eq!(
            config(&[("AUTH_BEARER", "k1,k2")])
                .unwrap()
                .secrets()
                .count(),
            2
        );
    }

    #[test]
    fn upstream_query_and_keepalive_are_parsed() {
        let parsed = config(&[
            ("AUTH_BEARER", "k"),
            ("UPSTREAM_QUERY", "?api-version=2024-10-21&x=a b"),
            ("SSE_KEEPALIVE_SECS", "15"),
        ])
        .unwrap();
        let query = parsed.upstream.query.unwrap();
        assert_eq!(query.encoded, "api-version=2024-10-21&x=a+b");
        assert_eq!(query.names, ["api-version", "x"]);
        assert_eq!(parsed.limits.sse_keepalive, Some(Duration::from_secs(15)));
        let bearer = ("AUTH_BEARER", "k");
        assert_eq!(
            error_variable(&[bearer, ("UPSTREAM_QUERY", "=1")]),
            "UPSTREAM_QUERY"
        );
        assert_eq!(
            error_variable(&[bearer, ("SSE_KEEPALIVE_SECS", "-1")]),
            "SSE_KEEPALIVE_SECS"
        );
        let off = config(&[bearer, ("SSE_KEEPALIVE_SECS", "0")]).unwrap();
        assert_eq!(off.limits.sse_keepalive, None);
    }

    #[test]
    fn a_ca_file_must_exist_and_hold_a_certificate() {
        let bearer = ("AUTH_BEARER", "k");
        let missing = config(&[bearer, ("UPSTREAM_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
        assert_eq!(missing.variable, "UPSTREAM_CA_FILE");
        let dir = std::env::temp_dir().join(format!("llm-proxy-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = config(&[bearer, ("UPSTREAM_CA_FILE", empty.to_str().unwrap())]).unwrap_err();
        assert_eq!(err.variable, "UPSTREAM_CA_FILE");
        assert!(err.message.contains("no PEM certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        assert_eq!(error_variable(&[]), "AUTH_BEARER");
        assert_eq!(error_variable(&[("AUTH_BEARER", "  ")]), "AUTH_BEARER");
        let bearer = ("AUTH_BEARER", "k");
        assert_eq!(
            error_variable(&[bearer, ("PROXY_PORT", "http")]),
            "PROXY_PORT"
        );
        assert_eq!(
            error_variable(&[bearer, ("PROXY_PORT", "70000")]),
            "PROXY_PORT"
        );
        assert_eq!(
            error_variable(&[bearer, ("TARGET_HOST", "ftp://x")]),
            "TARGET_HOST"
        );
        assert_eq!(
            error_variable(&[bearer, ("TARGET_HOST", "api.openai.com")]),
            "TARGET_HOST"
        );
        assert_eq!(
            error_variable(&[bearer, ("TARGET_HOST", "https://u:p@host")]),
            "TARGET_HOST"
        );
        assert_eq!(
            error_variable(&[bearer, ("LOG_LEVEL", "loud")]),
            "LOG_LEVEL"
        );
        assert_eq!(
            error_variable(&[bearer, ("DEBUG_MODE", "maybe")]),
            "DEBUG_MODE"
        );
        assert_eq!(
            error_variable(&[bearer, ("AUTH_VALIDATION", "true")]),
            "ALLOWED_TOKENS"
        );
        assert_eq!(
            error_variable(&[bearer, ("DEFAULT_AUTH_HEADER", "bad header")]),
            "DEFAULT_AUTH_HEADER"
        );
    }

    #[test]
    fn a_clients_file_implies_validation_and_joins_allowed_tokens() {
        let file = std::env::temp_dir().join(format!("llm-proxy-unit-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[clients.alice]\ntoken = \"tok-a\"\nrequests_per_minute = 5\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let config = config(&[("AUTH_BEARER", "k"), ("CLIENTS_FILE", path)]).unwrap();
        assert!(config.auth_validation);
        assert_eq!(config.clients.len(), 1);
        assert_eq!(config.state_dir, PathBuf::from("state"));
        let both = self::config(&[
            ("AUTH_BEARER", "k"),
            ("CLIENTS_FILE", path),
            ("ALLOWED_TOKENS", "bob:tok-b"),
        ])
        .unwrap();
        let names: Vec<&str> = both.clients.iter().map(|client| &*client.name).collect();
        assert_eq!(names, ["bob", "alice"]);
        for clash in ["alice:other", "carol:tok-a"] {
            let vars = [
                ("AUTH_BEARER", "k"),
                ("CLIENTS_FILE", path),
                ("ALLOWED_TOKENS", clash),
            ];
            assert_eq!(error_variable(&vars), "CLIENTS_FILE", "{clash}");
        }
        assert_eq!(
            error_variable(&[
                ("AUTH_BEARER", "k"),
                ("CLIENTS_FILE", path),
                ("AUTH_VALIDATION", "false")
            ]),
            "AUTH_VALIDATION"
        );
        assert_eq!(
            error_variable(&[
                ("AUTH_BEARER", "k"),
                ("CLIENTS_FILE", "/nonexistent/c.toml")
            ]),
            "CLIENTS_FILE"
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn errors_do_not_echo_secrets_or_urls() {
        let err = config(&[
            ("AUTH_BEARER", "sk-secret\n"),
            ("TARGET_HOST", "https://u:pw@h"),
        ])
        .unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}
