//! Every variable the proxy reads, in one table: its default (the parser's, `--help`'s and the
//! one the README and `.env.example` must show), whether a reload applies it, and a one-line
//! meaning. A test holds the documentation to it.

/// One setting of the public contract: the row `--help`, the parser's defaults, the reload's
/// restart warnings and the misspelling check all read.
pub struct Variable {
    pub name: &'static str,
    pub default: Default,
    pub reload: Reload,
    /// A prefix that marks an unknown name as almost surely meant for us (`PROXY_TIMEOUT`);
    /// `None` where the prefix is common among other programs' variables (`LOG_`, `WORKER_`).
    pub ours_by_prefix: Option<&'static str>,
    /// One line for `--help`.
    pub meaning: &'static str,
}

/// What a variable is when it is not set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    /// This value, parsed like one the operator set.
    Value(&'static str),
    /// Nothing: the feature is off, or there is no such setting.
    Unset,
    /// Start-up stops without it.
    Required,
    /// Worked out at start-up; the text says how.
    Computed(&'static str),
}

impl Default {
    /// As `--help` shows it.
    pub fn shown(self) -> &'static str {
        match self {
            Default::Value(value) | Default::Computed(value) => value,
            Default::Unset => "unset",
            Default::Required => "required",
        }
    }
}

/// What a reload (`SIGHUP`, a change of the clients file) does with a new value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Applied at once.
    Live,
    /// Logged as taking effect only after a restart.
    Restart,
    /// The file it names is re-read; a new path needs a restart.
    FileOnly,
}

pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "TARGET_HOST",
        default: Default::Value("https://api.example.com"),
        reload: Reload::Restart,
        ours_by_prefix: Some("TARGET_"),
        meaning: "upstream host; the client's /v1/... is appended (a path prefix is kept)",
    },
    Variable {
        name: "TARGET_BASE_URL",
        default: Default::Unset,
        reload: Reload::Restart,
        ours_by_prefix: Some("TARGET_"),
        meaning: "instead of TARGET_HOST: the provider's base URL; /v1/<rest> goes to it + /<rest>",
    },
    Variable {
        name: "AUTH_BEARER",
        default: Default::Required,
        reload: Reload::Restart,
        ours_by_prefix: Some("AUTH_"),
        meaning: "upstream API key, or several comma-separated, used in turn with failover \
                  (not with UPSTREAMS_FILE)",
    },
    Variable {
        name: "UPSTREAM_AUTH_HEADER",
        default: Default::Value("Authorization"),
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "header the upstream key goes in (Bearer for Authorization, else the bare key)",
    },
    Variable {
        name: "UPSTREAM_QUERY",
        default: Default::Unset,
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "query parameters added to every upstream request, e.g. api-version=2024-10-21",
    },
    Variable {
        name: "UPSTREAM_CA_FILE",
        default: Default::Unset,
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "PEM file of extra CA certificates trusted for the upstream",
    },
    Variable {
        name: "UPSTREAMS_FILE",
        default: Default::Unset,
        reload: Reload::FileOnly,
        ours_by_prefix: Some("UPSTREAMS_"),
        meaning: "TOML file of several upstreams routed by model; replaces TARGET_HOST, \
                  TARGET_BASE_URL and AUTH_BEARER",
    },
    Variable {
        name: "PRICES_FILE",
        default: Default::Unset,
        reload: Reload::FileOnly,
        ours_by_prefix: Some("PRICES_"),
        meaning: "TOML file of [prices] (USD per million tokens) and optionally prices_file \
                  (LiteLLM JSON) for the one upstream; not with UPSTREAMS_FILE, which has its own",
    },
    Variable {
        name: "PROXY_HOST",
        default: Default::Value("0.0.0.0"),
        reload: Reload::Restart,
        ours_by_prefix: Some("PROXY_"),
        meaning: "address to listen on (:: for IPv4 and IPv6)",
    },
    Variable {
        name: "PROXY_PORT",
        default: Default::Value("8080"),
        reload: Reload::Restart,
        ours_by_prefix: Some("PROXY_"),
        meaning: "port to listen on",
    },
    Variable {
        name: "LOG_LEVEL",
        default: Default::Value("info"),
        reload: Reload::Restart,
        ours_by_prefix: None,
        meaning: "debug, info or error",
    },
    Variable {
        name: "LOG_FORMAT",
        default: Default::Value("text"),
        reload: Reload::Restart,
        ours_by_prefix: None,
        meaning: "text or json",
    },
    Variable {
        name: "ERROR_FORMAT",
        default: Default::Value("proxy"),
        reload: Reload::Restart,
        ours_by_prefix: None,
        meaning: "body of the proxy's own errors: proxy ({\"error\":code,...}) or openai ({\"error\":{...}})",
    },
    Variable {
        name: "DEBUG_MODE",
        default: Default::Value("false"),
        reload: Reload::Restart,
        ours_by_prefix: Some("DEBUG_"),
        meaning: "log request and response details, secrets masked",
    },
    Variable {
        name: "AUTH_VALIDATION",
        default: Default::Value("false"),
        reload: Reload::Live,
        ours_by_prefix: Some("AUTH_"),
        meaning: "callers must present a token from ALLOWED_TOKENS",
    },
    Variable {
        name: "ALLOWED_TOKENS",
        default: Default::Unset,
        reload: Reload::Live,
        ours_by_prefix: Some("ALLOWED_"),
        meaning: "client tokens, comma-separated; name:token gives a label",
    },
    Variable {
        name: "CLIENTS_FILE",
        default: Default::Unset,
        reload: Reload::FileOnly,
        ours_by_prefix: Some("CLIENTS_"),
        meaning: "TOML file of clients with limits; implies AUTH_VALIDATION",
    },
    Variable {
        name: "STATE_DIR",
        default: Default::Value("state"),
        reload: Reload::Restart,
        ours_by_prefix: Some("STATE_"),
        meaning: "where the token and dollar budgets and the spend ledger survive restarts",
    },
    Variable {
        name: "DEFAULT_AUTH_HEADER",
        default: Default::Value("Authorization"),
        reload: Reload::Restart,
        ours_by_prefix: Some("DEFAULT_AUTH"),
        meaning: "header callers put their token in",
    },
    Variable {
        name: "ADMIN_TOKEN",
        default: Default::Unset,
        reload: Reload::Live,
        ours_by_prefix: Some("ADMIN_"),
        meaning: "token for /admin/*; unset: no admin routes",
    },
    Variable {
        name: "METRICS_TOKEN",
        default: Default::Unset,
        reload: Reload::Live,
        ours_by_prefix: Some("METRICS_"),
        meaning: "token for /metrics; unset: ADMIN_TOKEN, else open",
    },
    Variable {
        name: "UPSTREAM_HTTP2_CONNECTIONS",
        default: Default::Value("1"),
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "upstream connection pools taken in turn: HTTP/2 connections to an h2 upstream (1-64)",
    },
    Variable {
        name: "UPSTREAM_CONNECT_TIMEOUT_SECS",
        default: Default::Value("10"),
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "connecting to the upstream",
    },
    Variable {
        name: "UPSTREAM_TIMEOUT_SECS",
        default: Default::Value("600"),
        reload: Reload::Restart,
        ours_by_prefix: Some("UPSTREAM_"),
        meaning: "from sending a request to the upstream's response headers",
    },
    Variable {
        name: "STREAM_IDLE_TIMEOUT_SECS",
        default: Default::Value("300"),
        reload: Reload::Restart,
        ours_by_prefix: Some("STREAM_"),
        meaning: "longest silence in an upstream body or a WebSocket tunnel",
    },
    Variable {
        name: "HEADER_READ_TIMEOUT_SECS",
        default: Default::Value("10"),
        reload: Reload::Restart,
        ours_by_prefix: Some("HEADER_"),
        meaning: "time to send request headers; idle keep-alive",
    },
    Variable {
        name: "SSE_KEEPALIVE_SECS",
        default: Default::Value("0"),
        reload: Reload::Restart,
        ours_by_prefix: Some("SSE_"),
        meaning: "send ': keepalive' to an SSE client silent that long (0: off)",
    },
    Variable {
        name: "SHUTDOWN_GRACE_SECS",
        default: Default::Value("30"),
        reload: Reload::Restart,
        ours_by_prefix: Some("SHUTDOWN_"),
        meaning: "the drain after SIGTERM",
    },
    Variable {
        name: "MAX_BODY_BYTES",
        default: Default::Value("33554432"),
        reload: Reload::Restart,
        ours_by_prefix: Some("MAX_"),
        meaning: "largest request body",
    },
    Variable {
        name: "MAX_CONCURRENT_REQUESTS",
        default: Default::Value("1024"),
        reload: Reload::Restart,
        ours_by_prefix: Some("MAX_"),
        meaning: "requests in flight, streams and tunnels included",
    },
    Variable {
        name: "REDIS_URL",
        default: Default::Unset,
        reload: Reload::Restart,
        ours_by_prefix: Some("REDIS_"),
        meaning: "redis:// or rediss:// (TLS); every replica using it shares the clients' \
                  requests_per_minute, tokens_per_minute, max_concurrent_requests and \
                  tokens_per_day (budgets then not in STATE_DIR), their /admin/clients usage, \
                  and the upstream key rests after a 429; unset: each process on its own",
    },
    Variable {
        name: "REDIS_TIMEOUT_MS",
        default: Default::Value("50"),
        reload: Reload::Restart,
        ours_by_prefix: Some("REDIS_"),
        meaning: "longest wait for Redis; slower or down: local state until it answers",
    },
    Variable {
        name: "REDIS_FALLBACK_REPLICAS",
        default: Default::Value("1"),
        reload: Reload::Restart,
        ours_by_prefix: Some("REDIS_"),
        meaning: "while Redis is down, shared per-client limits are divided by this",
    },
    Variable {
        name: "WORKER_THREADS",
        default: Default::Computed("one per core"),
        reload: Reload::Restart,
        ours_by_prefix: None,
        meaning: "worker threads of the runtime, 1 to 1024",
    },
];

pub fn find(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|variable| variable.name == name)
}

pub fn is_known(name: &str) -> bool {
    find(name).is_some()
}

/// The value a variable has when it is not set, for those that have one.
pub fn default_value(name: &str) -> Option<&'static str> {
    match find(name)?.default {
        Default::Value(value) => Some(value),
        _ => None,
    }
}

/// The variables a reload cannot change.
pub fn restart_only() -> impl Iterator<Item = &'static Variable> {
    VARIABLES
        .iter()
        .filter(|variable| variable.reload == Reload::Restart)
}

/// For a name that is not ours: the variable it most likely misspells, if any. Close means an
/// edit distance of at most 2 (3 for long names), or one of our prefixes with an unknown rest.
pub fn likely_meant(name: &str) -> Option<&'static str> {
    if is_known(name) {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    if let Some(variable) = find(&upper) {
        return Some(variable.name);
    }
    let (closest, distance) = VARIABLES
        .iter()
        .map(|variable| (variable.name, edit_distance(&upper, variable.name)))
        .min_by_key(|(_, distance)| *distance)?;
    let allowed = if closest.len() >= 12 { 3 } else { 2 };
    if distance <= allowed {
        return Some(closest);
    }
    VARIABLES
        .iter()
        .filter_map(|variable| variable.ours_by_prefix)
        .any(|prefix| upper.starts_with(prefix))
        .then_some(closest)
}

/// Levenshtein distance over bytes (our names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, &left) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &right) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(left != right);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documents held to the table, compiled in so that a test run always reads the
    /// versions it was built with.
    fn document(name: &str) -> String {
        match name {
            "README.md" => include_str!("../../README.md"),
            "README.zh-CN.md" => include_str!("../../README.zh-CN.md"),
            ".env.example" => include_str!("../../.env.example"),
            other => panic!("{other} is not a document held to the table"),
        }
        .to_string()
    }

    fn cells(line: &str) -> Vec<&str> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(str::trim).collect()
    }

    /// The text of the first `code span` in a cell.
    fn first_code_span(cell: &str) -> Option<&str> {
        let (_, rest) = cell.split_once('`')?;
        rest.split_once('`').map(|(code, _)| code)
    }

    /// Every row of a Markdown table with a default column whose first cell is a variable of
    /// ours: the variable and that default cell.
    fn documented_defaults<'a>(text: &'a str, default_headers: &[&str]) -> Vec<(&'a str, &'a str)> {
        let lines: Vec<&str> = text.lines().collect();
        let mut rows = Vec::new();
        let mut column = None;
        for (index, line) in lines.iter().enumerate() {
            if !line.starts_with('|') {
                column = None;
                continue;
            }
            let next_is_rule = lines
                .get(index + 1)
                .is_some_and(|next| next.starts_with("|---"));
            if next_is_rule {
                column = cells(line)
                    .iter()
                    .position(|cell| default_headers.contains(cell));
                continue;
            }
            let (Some(column), row) = (column, cells(line)) else {
                continue;
            };
            let Some(name) = row.first().and_then(|cell| first_code_span(cell)) else {
                continue;
            };
            if let (Some(variable), Some(default)) = (find(name), row.get(column)) {
                rows.push((variable.name, *default));
            }
        }
        rows
    }

    fn check_readme(file: &str, default_headers: &[&str], required: &str) {
        let text = document(file);
        let rows = documented_defaults(&text, default_headers);
        for variable in VARIABLES {
            let documented: Vec<&str> = rows
                .iter()
                .filter(|(name, _)| *name == variable.name)
                .map(|(_, default)| *default)
                .collect();
            assert!(
                !documented.is_empty(),
                "{file}: {} is not in a table with a default column",
                variable.name
            );
            for cell in documented {
                match variable.default {
                    Default::Value(value) => assert_eq!(
                        first_code_span(cell),
                        Some(value),
                        "{file}: the default of {} is {value}, not {cell:?}",
                        variable.name
                    ),
                    Default::Required => assert!(
                        first_code_span(cell).is_none() && cell.contains(required),
                        "{file}: {} is required, not {cell:?}",
                        variable.name
                    ),
                    Default::Unset | Default::Computed(_) => assert!(
                        first_code_span(cell).is_none(),
                        "{file}: {} has no default value, not {cell:?}",
                        variable.name
                    ),
                }
            }
        }
    }

    #[test]
    fn the_readmes_document_every_variable_with_the_tables_default() {
        check_readme("README.md", &["Default"], "required");
        check_readme("README.zh-CN.md", &["默认值"], "必需");
    }

    #[test]
    fn env_example_sets_every_variable_to_its_default() {
        let text = document(".env.example");
        let assignments: Vec<(&str, &str)> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .collect();
        for (name, _) in &assignments {
            assert!(
                is_known(name),
                ".env.example sets {name}, which is not ours"
            );
        }
        for variable in VARIABLES {
            let value = assignments
                .iter()
                .find(|(name, _)| *name == variable.name)
                .map(|(_, value)| value.trim())
                .unwrap_or_else(|| panic!(".env.example has no {}=", variable.name));
            match variable.default {
                Default::Value(default) => {
                    assert_eq!(value, default, ".env.example: {}", variable.name)
                }
                // An example key in place of the required one.
                Default::Required => assert!(!value.is_empty(), "{}", variable.name),
                Default::Unset | Default::Computed(_) => {
                    assert_eq!(value, "", ".env.example: {}", variable.name)
                }
            }
        }
    }

    #[test]
    fn every_default_is_accepted_by_the_parser() {
        let config = crate::config::Config::from_lookup(|name| {
            (name == "AUTH_BEARER").then(|| "k".to_string())
        });
        assert!(config.is_ok(), "{:?}", config.err());
    }

    #[test]
    fn help_defaults_and_the_restart_list_come_from_the_table() {
        assert_eq!(default_value("PROXY_PORT"), Some("8080"));
        assert_eq!(default_value("AUTH_BEARER"), None);
        let restart: Vec<&str> = restart_only().map(|variable| variable.name).collect();
        assert!(restart.contains(&"PROXY_PORT"));
        for live in [
            "ALLOWED_TOKENS",
            "ADMIN_TOKEN",
            "METRICS_TOKEN",
            "AUTH_VALIDATION",
        ] {
            assert!(!restart.contains(&live), "{live}");
        }
        for file in ["CLIENTS_FILE", "UPSTREAMS_FILE", "PRICES_FILE"] {
            assert!(!restart.contains(&file), "the reload re-reads {file}");
        }
    }

    #[test]
    fn misspellings_point_at_the_variable_meant() {
        // Lower case here only so that these misspellings are not taken for settings to
        // document; names are compared in upper case.
        assert_eq!(likely_meant("auth_validaton"), Some("AUTH_VALIDATION"));
        assert_eq!(likely_meant("Auth_Validation"), Some("AUTH_VALIDATION"));
        assert_eq!(likely_meant("target_hots"), Some("TARGET_HOST"));
        assert_eq!(
            likely_meant("max_concurent_requests"),
            Some("MAX_CONCURRENT_REQUESTS")
        );
        assert!(likely_meant("proxy_timeout").is_some(), "a known prefix");
    }

    #[test]
    fn other_programs_variables_are_left_alone() {
        for name in [
            "PATH",
            "HOME",
            "HOSTNAME",
            "https_proxy",
            "no_proxy",
            "rust_log",
            "TERM",
            "AUTH_BEARER",
            "LANG",
            "cargo_home",
        ] {
            assert_eq!(likely_meant(name), None, "{name}");
        }
    }
}
