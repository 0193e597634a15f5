//! Every variable the proxy reads, with its default and a one-line meaning: the list behind
//! `--help` and the check for misspelt names at start-up.

/// One setting of the public contract.
pub struct Variable {
    pub name: &'static str,
    /// As shown by `--help`; `unset` when there is none.
    pub default: &'static str,
    pub meaning: &'static str,
}

const fn var(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable {
        name,
        default,
        meaning,
    }
}

pub const VARIABLES: &[Variable] = &[
    var(
        "TARGET_HOST",
        "https://api.example.com",
        "upstream host; the client's /v1/... is appended (a path prefix is kept)",
    ),
    var(
        "TARGET_BASE_URL",
        "unset",
        "instead of TARGET_HOST: the provider's base URL; /v1/<rest> goes to it + /<rest>",
    ),
    var(
        "AUTH_BEARER",
        "required",
        "upstream API key, or several comma-separated, used in turn with failover",
    ),
    var(
        "UPSTREAM_AUTH_HEADER",
        "Authorization",
        "header the upstream key goes in (Bearer for Authorization, else the bare key)",
    ),
    var(
        "UPSTREAM_QUERY",
        "unset",
        "query parameters added to every upstream request, e.g. api-version=2024-10-21",
    ),
    var(
        "UPSTREAM_CA_FILE",
        "unset",
        "PEM file of extra CA certificates trusted for the upstream",
    ),
    var(
        "PROXY_HOST",
        "0.0.0.0",
        "address to listen on (:: for IPv4 and IPv6)",
    ),
    var("PROXY_PORT", "8080", "port to listen on"),
    var("LOG_LEVEL", "info", "debug, info or error"),
    var("LOG_FORMAT", "text", "text or json"),
    var(
        "ERROR_FORMAT",
        "proxy",
        "body of the proxy's own errors: proxy, or openai for the OpenAI SDKs' error object",
    ),
    var(
        "DEBUG_MODE",
        "false",
        "log request and response details, secrets masked",
    ),
    var(
        "AUTH_VALIDATION",
        "false",
        "callers must present a token from ALLOWED_TOKENS",
    ),
    var(
        "ALLOWED_TOKENS",
        "unset",
        "client tokens, comma-separated; name:token gives a label",
    ),
    var(
        "CLIENTS_FILE",
        "unset",
        "TOML file of clients with limits; implies AUTH_VALIDATION",
    ),
    var(
        "STATE_DIR",
        "state",
        "where daily token budgets survive restarts",
    ),
    var(
        "DEFAULT_AUTH_HEADER",
        "Authorization",
        "header callers put their token in",
    ),
    var(
        "ADMIN_TOKEN",
        "unset",
        "token for /admin/*; unset: no admin routes",
    ),
    var(
        "METRICS_TOKEN",
        "unset",
        "token for /metrics; unset: ADMIN_TOKEN, else open",
    ),
    var(
        "UPSTREAM_HTTP2_CONNECTIONS",
        "1",
        "upstream connection pools taken in turn: HTTP/2 connections to an h2 upstream (1-64)",
    ),
    var(
        "UPSTREAM_CONNECT_TIMEOUT_SECS",
        "10",
        "connecting to the upstream",
    ),
    var(
        "UPSTREAM_TIMEOUT_SECS",
        "600",
        "from sending a request to the upstream's response headers",
    ),
    var(
        "STREAM_IDLE_TIMEOUT_SECS",
        "300",
        "longest silence in an upstream body or a WebSocket tunnel",
    ),
    var(
        "HEADER_READ_TIMEOUT_SECS",
        "10",
        "time to send request headers; idle keep-alive",
    ),
    var(
        "SSE_KEEPALIVE_SECS",
        "0",
        "send ': keepalive' to an SSE client silent that long (0: off)",
    ),
    var("SHUTDOWN_GRACE_SECS", "30", "the drain after SIGTERM"),
    var("MAX_BODY_BYTES", "33554432", "largest request body"),
    var(
        "MAX_CONCURRENT_REQUESTS",
        "1024",
        "requests in flight, streams and tunnels included",
    ),
    var(
        "REDIS_URL",
        "unset",
        "redis:// or rediss:// (TLS): key rests shared by replicas; unset: per process",
    ),
    var(
        "REDIS_TIMEOUT_MS",
        "50",
        "longest wait for Redis; slower or down: local state until it answers",
    ),
    var(
        "REDIS_FALLBACK_REPLICAS",
        "1",
        "while Redis is down, shared per-client limits are divided by this",
    ),
    var(
        "WORKER_THREADS",
        "one per core",
        "worker threads of the runtime, 1 to 1024",
    ),
];

/// Prefixes of our names: an unknown name with one of them is almost surely meant for us.
const PREFIXES: &[&str] = &[
    "AUTH_",
    "PROXY_",
    "TARGET_",
    "UPSTREAM_",
    "STREAM_",
    "SSE_",
    "HEADER_",
    "SHUTDOWN_",
    "MAX_",
    "ADMIN_",
    "METRICS_",
    "ALLOWED_",
    "DEFAULT_AUTH",
    "DEBUG_",
    "CLIENTS_",
    "STATE_",
    "REDIS_",
];

pub fn is_known(name: &str) -> bool {
    VARIABLES.iter().any(|variable| variable.name == name)
}

/// For a name that is not ours: the variable it most likely misspells, if any. Close means an
/// edit distance of at most 2 (3 for long names), or one of our prefixes with an unknown rest.
pub fn likely_meant(name: &str) -> Option<&'static str> {
    if is_known(name) {
        return None;
    }
    let upper = name.to_ascii_uppercase();
    if is_known(&upper) {
        return VARIABLES
            .iter()
            .find(|variable| variable.name == upper)
            .map(|variable| variable.name);
    }
    let (closest, distance) = VARIABLES
        .iter()
        .map(|variable| (variable.name, edit_distance(&upper, variable.name)))
        .min_by_key(|(_, distance)| *distance)?;
    let allowed = if closest.len() >= 12 { 3 } else { 2 };
    if distance <= allowed {
        return Some(closest);
    }
    PREFIXES
        .iter()
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
