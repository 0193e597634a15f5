//! Configuration from the environment, then `.env.local`, then `.env` (the real environment wins):
//! loaded, validated and parsed once, so that what is built from it cannot fail.
//!
//! One job a file: [`env`] merges the sources, [`variables`] is the table of every variable
//! (defaults, reload, help), [`values`] parses single values, [`upstream`] and [`limits`] the
//! settings of their part, [`upstreams`] the upstreams file (or the environment's one upstream),
//! [`clients`] the clients file, [`error`] the error that names the variable. Parsing is separate from the process environment (`Config::from_lookup`) so tests
//! can build any configuration without touching global state.

pub mod clients;
mod env;
mod error;
mod limits;
pub mod prices;
mod redis;
mod secret;
mod upstream;
mod upstreams;
mod values;
pub mod variables;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use warp::http::HeaderName;

pub use clients::{Client, ClientLimits, ClientToken};
pub use env::{Settings, environment};
pub use error::ConfigError;
use error::invalid;
pub use limits::Limits;
pub use redis::{RedisUrl, SharedStateConfig};
pub use secret::{Secret, digest, token_label};
pub use upstream::{CaFile, ConnectionSettings, UpstreamConfig, UpstreamKey};
pub use upstreams::{NamedUpstream, UpstreamDefaults, UpstreamsConfig};
pub use values::{UpstreamQuery, is_client_name};

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

impl LogFormat {
    /// `LOG_FORMAT` for the lines written before the configuration is known to be valid (a
    /// configuration error, `healthcheck`): JSON when JSON was asked for, else text.
    pub fn asked_for(lookup: impl Fn(&str) -> Option<String>) -> LogFormat {
        match lookup("LOG_FORMAT") {
            Some(format) if format.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// `ERROR_FORMAT`: the body the proxy's own errors are written in. Read at start-up only: a
/// client library is written against one shape, and a reload that changed it under running
/// clients would break them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorFormat {
    /// `{"error":"<code>","message":"<text>","time":"<RFC 3339>"}`, the shape the proxy has
    /// always had.
    #[default]
    Proxy,
    /// `{"error":{"message":"<text>","type":"<OpenAI type>","code":"<code>","param":null}}`, the
    /// object the OpenAI SDKs read `message` and `code` from.
    OpenAi,
}

impl ErrorFormat {
    /// The accepted values of `ERROR_FORMAT`, as the start-up error lists them.
    pub const ACCEPTED: &'static str = "proxy, openai";

    /// `proxy` or `openai`, in any case.
    pub fn parse(value: &str) -> Option<ErrorFormat> {
        match value.to_ascii_lowercase().as_str() {
            "proxy" => Some(ErrorFormat::Proxy),
            "openai" => Some(ErrorFormat::OpenAi),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The settings of the `default` upstream of `upstreams`.
    pub upstream: UpstreamConfig,
    /// `UPSTREAMS_FILE`, or the environment's one upstream.
    pub upstreams: UpstreamsConfig,
    /// `PRICES_FILE`, read again on reload: the one upstream's prices (in `upstreams.prices`).
    pub prices_file: Option<PathBuf>,
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
    /// The variables a reload cannot change, as they were read.
    restart_only: RestartOnly,
}

/// Each restart-only variable of the table with a fingerprint of its value (a short hash: some
/// are secrets), so a reload can tell which changed. Not printed with the configuration.
#[derive(Clone, PartialEq, Eq)]
struct RestartOnly(Vec<(&'static str, Option<String>)>);

impl fmt::Debug for RestartOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("..")
    }
}

/// `PROXY_HOST` and `PROXY_PORT`, read on their own by `healthcheck`, which must not need the
/// rest of the configuration.
pub fn listen_address<F: Fn(&str) -> Option<String>>(
    settings: &Settings<F>,
) -> Result<SocketAddr, ConfigError> {
    let host = settings.value("PROXY_HOST").unwrap_or_default();
    let host = host.parse::<IpAddr>().map_err(|_| {
        invalid(
            "PROXY_HOST",
            format!(
                "{host:?} is not an IP address (accepted: 0.0.0.0, ::, 127.0.0.1, ::1, \
                 or one address of this machine)"
            ),
        )
    })?;
    let port = settings.value("PROXY_PORT").unwrap_or_default();
    let port = port.parse::<u16>().map_err(|_| {
        invalid(
            "PROXY_PORT",
            format!("{port:?} is not a port number (accepted: 0-65535)"),
        )
    })?;
    Ok(SocketAddr::new(host, port))
}

impl Config {
    /// Reads the process environment, then `.env.local`, then `.env` in the working directory.
    pub fn load() -> Result<Config, ConfigError> {
        let variables = environment()?;
        Config::from_lookup(|name| variables.get(name).cloned())
    }

    /// Builds and validates a configuration from any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let settings = Settings::new(lookup);
        let limits = Limits::parse(&settings)?;
        let prices_file = settings.set("PRICES_FILE").map(PathBuf::from);
        // Two places for prices would leave it unclear which one counts.
        if prices_file.is_some() && settings.set("UPSTREAMS_FILE").is_some() {
            return Err(invalid(
                "PRICES_FILE",
                "cannot be set together with UPSTREAMS_FILE: an upstreams file holds its own \
                 prices ([prices], [upstreams.<name>.prices], prices_file); move them there and \
                 remove PRICES_FILE",
            ));
        }
        let mut upstreams = match settings.set("UPSTREAMS_FILE") {
            None => UpstreamsConfig::single(
                UpstreamConfig::parse(&settings, limits.upstream_connect_timeout)?,
                limits.upstream_timeout,
            ),
            Some(path) => {
                // The file says where each upstream is and which keys it takes: a variable that
                // says it too would be ignored, and an operator would not know which one counts.
                let also: Vec<&str> = ["TARGET_HOST", "TARGET_BASE_URL", "AUTH_BEARER"]
                    .into_iter()
                    .filter(|name| settings.set(name).is_some())
                    .collect();
                if !also.is_empty() {
                    return Err(invalid(
                        "UPSTREAMS_FILE",
                        format!(
                            "cannot be set together with {}: with an upstreams file each \
                             upstream's URL is its base_url and its keys are in keys_file or \
                             keys_env; remove {}",
                            also.join(", "),
                            also.join(", ")
                        ),
                    ));
                }
                UpstreamsConfig::load(
                    std::path::Path::new(&path),
                    |name| settings.set(name),
                    UpstreamDefaults::from_limits(&limits),
                )?
            }
        };
        if let Some(path) = &prices_file {
            (upstreams.prices, upstreams.litellm_file) = prices::load_prices_file(path)?;
        }
        let upstream = upstreams.default_upstream().settings.clone();
        let listen = listen_address(&settings)?;

        let log_level = match settings
            .value("LOG_LEVEL")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            Some("info") => LogLevel::Info,
            Some("debug") => LogLevel::Debug,
            Some("error") => LogLevel::Error,
            other => {
                return Err(invalid(
                    "LOG_LEVEL",
                    format!(
                        "{:?} is not a log level (accepted: debug, info, error)",
                        other.unwrap_or_default()
                    ),
                ));
            }
        };

        let debug_mode = values::boolean("DEBUG_MODE", settings.value("DEBUG_MODE"))?;
        let clients_file = settings.set("CLIENTS_FILE").map(PathBuf::from);
        // A clients file is a list of who may call: it makes no sense with validation off, and
        // silently ignoring it would leave the proxy open.
        let auth_validation = match (settings.set("AUTH_VALIDATION"), &clients_file) {
            (None, Some(_)) => true,
            (value, Some(_)) if !values::boolean("AUTH_VALIDATION", value.clone())? => {
                return Err(invalid(
                    "AUTH_VALIDATION",
                    "is false but CLIENTS_FILE is set: a clients file turns validation on; \
                     remove one of the two",
                ));
            }
            _ => values::boolean("AUTH_VALIDATION", settings.value("AUTH_VALIDATION"))?,
        };

        let allowed_tokens: Vec<ClientToken> = settings
            .set("ALLOWED_TOKENS")
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
        let clients = clients::known(&allowed_tokens, clients_file.as_deref())?;
        let state_dir = PathBuf::from(settings.value("STATE_DIR").unwrap_or_default());
        let auth_header = values::header_name(
            "DEFAULT_AUTH_HEADER",
            &settings.value("DEFAULT_AUTH_HEADER").unwrap_or_default(),
        )?;

        let admin_token = settings.set("ADMIN_TOKEN").map(Secret::new);
        let metrics_token = settings.set("METRICS_TOKEN").map(Secret::new);

        let log_format = match settings
            .value("LOG_FORMAT")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            other => {
                return Err(invalid(
                    "LOG_FORMAT",
                    format!(
                        "{:?} is not a log format (accepted: text, json)",
                        other.unwrap_or_default()
                    ),
                ));
            }
        };

        let error_format = match settings.set("ERROR_FORMAT") {
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

        let worker_threads = values::worker_threads(settings.set("WORKER_THREADS"))?;
        let shared = redis::shared_state(&settings)?;
        let restart_only = RestartOnly(
            variables::restart_only()
                .map(|variable| {
                    let value = settings.value(variable.name);
                    (
                        variable.name,
                        value.map(|value| token_label(&Secret::new(value))),
                    )
                })
                .collect(),
        );

        Ok(Config {
            upstream,
            upstreams,
            prices_file,
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
            restart_only,
        })
    }

    /// Every secret the configuration holds, for redaction.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.upstreams
            .list
            .iter()
            .flat_map(|upstream| upstream.settings.keys.iter().map(|key| &key.key))
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

    /// The restart-only variables (the table's) whose value differs in `newer`: a reload logs
    /// them as taking effect only after a restart. A variable unset is its default.
    pub fn changed_restart_only(&self, newer: &Config) -> Vec<&'static str> {
        self.restart_only
            .0
            .iter()
            .zip(&newer.restart_only.0)
            .filter(|(old, new)| old != new)
            .map(|((name, _), _)| *name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

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
                .map(|config| config.upstream.connection.pools)
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
        assert_eq!(default.upstream.connection.pools, 1);
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
        assert_eq!(
            config.limits,
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
        );
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.host, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(config.state_dir, PathBuf::from("state"));
        assert_eq!(config.upstream.connection.pools, 1);
        assert!(config.upstream.connection.ca_file.is_none());
        assert_eq!(config.shared.timeout, Duration::from_millis(50));
        assert_eq!(config.shared.fallback_replicas, 1);
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
    fn an_allowed_empty_clients_file_alone_lets_nobody_in() {
        let file =
            std::env::temp_dir().join(format!("llm-proxy-unit-empty-{}.toml", std::process::id()));
        std::fs::write(&file, "allow_empty = true\n").unwrap();
        let path = file.to_str().unwrap();
        let config = config(&[("AUTH_BEARER", "k"), ("CLIENTS_FILE", path)]).unwrap();
        // Validation stays on with nobody to validate: every token is refused, not every token
        // let through.
        assert!(config.auth_validation);
        assert!(config.clients.is_empty());
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            error_variable(&[("AUTH_BEARER", "k"), ("CLIENTS_FILE", path)]),
            "CLIENTS_FILE"
        );
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn an_upstreams_file_replaces_the_environments_upstream() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-unit-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("upstreams.toml");
        std::fs::write(
            &file,
            "default = \"b\"\n\
             [upstreams.a]\nbase_url = \"https://a.example/v1\"\nkeys_env = \"OPENAI_KEYS\"\nmodels = [\"x\"]\n\
             [upstreams.b]\nbase_url = \"https://b.example/v1\"\nkeys_env = \"AZURE_EU_KEYS\"\nmodels = [\"y\"]\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let keys = [("OPENAI_KEYS", "a1,a2"), ("AZURE_EU_KEYS", "b1")];
        let with_file = config(&[("UPSTREAMS_FILE", path), keys[0], keys[1]]).unwrap();
        assert_eq!(with_file.upstreams.list.len(), 2);
        assert_eq!(with_file.upstreams.file.as_deref(), Some(file.as_path()));
        assert_eq!(
            with_file.upstream, with_file.upstreams.list[1].settings,
            "Config.upstream is the default upstream's"
        );
        assert_eq!(
            with_file.upstreams.list[1].timeout,
            with_file.limits.upstream_timeout
        );
        let secrets: Vec<&str> = with_file.secrets().map(Secret::expose).collect();
        for key in ["a1", "a2", "b1"] {
            assert!(secrets.contains(&key), "{key} is redacted");
        }

        for variable in ["TARGET_HOST", "TARGET_BASE_URL", "AUTH_BEARER"] {
            let value = if variable == "AUTH_BEARER" {
                "k"
            } else {
                "https://h/v1"
            };
            let err = config(&[
                ("UPSTREAMS_FILE", path),
                keys[0],
                keys[1],
                (variable, value),
            ])
            .unwrap_err();
            assert_eq!(err.variable, "UPSTREAMS_FILE", "{variable}");
            assert!(err.message.contains(variable), "{variable}: {err}");
        }
        let missing = config(&[("UPSTREAMS_FILE", path), keys[0]]).unwrap_err();
        assert_eq!(missing.variable, "UPSTREAMS_FILE");
        assert!(
            missing
                .message
                .contains("upstreams.b.keys_env: AZURE_EU_KEYS is not set"),
            "{missing}"
        );
        let gone = config(&[("UPSTREAMS_FILE", "/nonexistent/upstreams.toml")]).unwrap_err();
        assert_eq!(gone.variable, "UPSTREAMS_FILE");
        assert!(gone.message.contains("cannot be read"), "{gone}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_an_upstreams_file_the_environment_is_one_upstream_named_default() {
        let config = config(&[("AUTH_BEARER", "k1,k2"), ("UPSTREAM_TIMEOUT_SECS", "7")]).unwrap();
        let upstreams = &config.upstreams;
        assert_eq!(upstreams.file, None);
        assert_eq!(upstreams.list.len(), 1);
        let only = upstreams.default_upstream();
        assert_eq!(&*only.name, "default");
        assert_eq!(only.settings, config.upstream);
        assert_eq!(only.timeout, Duration::from_secs(7));
        assert!(only.models.matches("any-model"));
        assert_eq!(upstreams.max_attempts, None);
        assert_eq!(config.secrets().count(), 2, "each key once");
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
