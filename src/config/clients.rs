//! The clients file (`CLIENTS_FILE`): one TOML table per client under `[clients.<name>]`, with
//! its token (or the token's SHA-256) and optional limits, read by serde with unknown fields
//! refused. Every problem names the client and the field; nothing here echoes a token.

use std::collections::HashSet;
use std::path::Path;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use std::sync::Arc;
use std::time::SystemTime;

use super::error::{ConfigError, invalid};
use super::{Secret, digest, is_client_name, token_label};
use crate::vocab::price::{Nanos, nanos_of_usd};

/// One `ALLOWED_TOKENS` entry: `token`, or `name:token` to give the client a readable label in
/// metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientToken {
    pub name: Option<String>,
    pub token: Secret,
}

impl ClientToken {
    pub(super) fn parse(entry: &str) -> ClientToken {
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

/// Every known caller: the `ALLOWED_TOKENS` entries, then the clients file's (`CLIENTS_FILE`).
pub(super) fn known(
    allowed_tokens: &[ClientToken],
    file: Option<&Path>,
) -> Result<Vec<Client>, ConfigError> {
    let mut clients: Vec<Client> = allowed_tokens
        .iter()
        .map(Client::from_allowed_token)
        .collect();
    let Some(path) = file else {
        return Ok(clients);
    };
    let text = std::fs::read_to_string(path).map_err(|err| {
        invalid(
            "CLIENTS_FILE",
            format!("{} cannot be read: {err}", path.display()),
        )
    })?;
    let from_file = parse(&text)
        .map_err(|message| invalid("CLIENTS_FILE", format!("{}: {message}", path.display())))?;
    for client in &from_file {
        // One name is one set of counters: an ALLOWED_TOKENS entry of the same name would share
        // (and spend) the file client's limits.
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
    Ok(clients)
}

/// One caller the proxy knows: from the clients file, or an `ALLOWED_TOKENS` entry (no limits).
#[derive(Clone)]
pub struct Client {
    /// The label in logs, metrics and `/admin/clients`.
    pub name: Arc<str>,
    /// SHA-256 of the token: all the token check needs.
    pub digest: [u8; 32],
    /// The token itself when the configuration holds it (masked in debug logs); `None` for a
    /// `token_sha256` entry.
    pub token: Option<Secret>,
    pub limits: ClientLimits,
}

/// The name and limits only: neither the token nor its digest is for logs.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What the file may say about a client, every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u64>,
    /// The daily budget; the day is UTC.
    pub tokens_per_day: Option<u64>,
    /// The dollar budgets, in nano-dollars: per UTC day and per UTC calendar month.
    pub usd_per_day: Option<Nanos>,
    pub usd_per_month: Option<Nanos>,
    /// The output tokens reserved for a request that names no output cap; `None`:
    /// [`DEFAULT_OUTPUT_RESERVATION`].
    pub default_output_reservation: Option<u64>,
    /// Exact names or a prefix ending in `*`; `None`: every model.
    pub models: Option<Vec<String>>,
    /// With `models`: the endpoints that generate without naming a model where the proxy can
    /// read it (batches, eval runs, ...) which the client may call all the same, as canonical
    /// `/v1/...` paths, exact or a prefix ending in `*`; `None`: none of them.
    pub endpoints: Option<Vec<String>>,
    pub expires_at: Option<SystemTime>,
    pub disabled: bool,
}

/// The output tokens a request naming no `max_tokens` (nor its variants) reserves by default.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 4096;

impl ClientLimits {
    /// Whether the proxy needs the request's body (its `model`, its size) for this client.
    pub fn reads_body(&self) -> bool {
        self.models.is_some() || self.counts_tokens() || self.has_dollar_budget()
    }

    /// Whether the client has a budget (tokens or dollars) that must be kept across restarts.
    pub fn has_budget(&self) -> bool {
        self.tokens_per_day.is_some() || self.has_dollar_budget()
    }

    /// Whether the client has a budget in dollars: its requests are then priced before they go.
    pub fn has_dollar_budget(&self) -> bool {
        self.usd_per_day.is_some() || self.usd_per_month.is_some()
    }

    /// The output tokens reserved when the request names no cap.
    pub fn output_reservation(&self) -> u64 {
        self.default_output_reservation
            .unwrap_or(DEFAULT_OUTPUT_RESERVATION)
    }

    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.tokens_per_day.is_some()
    }

    /// Whether any limit the limiter keeps state for is set (the rate-limit headers then describe
    /// this client rather than the shared key).
    pub fn is_limited(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.max_concurrent_requests.is_some()
            || self.counts_tokens()
            || self.has_dollar_budget()
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|patterns| {
            patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => model == pattern,
                })
        })
    }

    /// Whether `path` (canonical) is one of the `endpoints` the client may call.
    pub fn allows_endpoint(&self, path: &str) -> bool {
        self.endpoints.as_ref().is_some_and(|patterns| {
            patterns
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == pattern,
                })
        })
    }

    /// Refused like an unknown token: disabled, or at or past `expires_at`.
    pub fn is_active(&self, now: SystemTime) -> bool {
        !self.disabled && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

impl Client {
    pub fn from_allowed_token(entry: &ClientToken) -> Client {
        Client {
            name: entry.label(),
            digest: digest(entry.token.expose().as_bytes()),
            token: Some(entry.token.clone()),
            limits: ClientLimits::default(),
        }
    }
}

/// The file: `[clients.<name>]` tables, and above them `allow_empty`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    /// A file with no client is refused unless it says so: an empty file is far more often a
    /// mistake (a truncated write, a ConfigMap key misnamed) than a wish to let no client in.
    #[serde(default, deserialize_with = "boolean")]
    allow_empty: bool,
    /// Kept as TOML until each name is checked, so an error names the client it is about.
    #[serde(default)]
    clients: toml::Table,
}

/// One `[clients.<name>]` table. Each field's parser checks its value and says what it accepts;
/// the error is prefixed with the client and field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default, deserialize_with = "token")]
    token: Option<Secret>,
    #[serde(default, deserialize_with = "token_sha256")]
    token_sha256: Option<[u8; 32]>,
    #[serde(default, deserialize_with = "count")]
    requests_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    tokens_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    max_concurrent_requests: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    tokens_per_day: Option<u64>,
    #[serde(default, deserialize_with = "dollars")]
    usd_per_day: Option<Nanos>,
    #[serde(default, deserialize_with = "dollars")]
    usd_per_month: Option<Nanos>,
    #[serde(default, deserialize_with = "count")]
    default_output_reservation: Option<u64>,
    #[serde(default, deserialize_with = "models")]
    models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "endpoints")]
    endpoints: Option<Vec<String>>,
    #[serde(default, deserialize_with = "date_time")]
    expires_at: Option<SystemTime>,
    #[serde(default, deserialize_with = "boolean")]
    disabled: bool,
}

/// Parses the text of a clients file. The error is one line naming the client and field.
pub fn parse(text: &str) -> Result<Vec<Client>, String> {
    let document: toml::Table = text
        .parse()
        .map_err(|err: toml::de::Error| format!("is not valid TOML: {}", one_line(&err)))?;
    let file: ClientsFile = serde_path_to_error::deserialize(toml::Value::Table(document))
        .map_err(|err| at_path("", &err))?;
    if file.clients.is_empty() && !file.allow_empty {
        return Err(
            "has no clients (no [clients.<name>] table); if that is meant, put \
             allow_empty = true at the top of the file"
                .to_string(),
        );
    }
    let mut clients = Vec::new();
    for (name, entry) in file.clients {
        clients.push(parse_client(&name, entry)?);
    }
    let mut digests = HashSet::new();
    for client in &clients {
        if !digests.insert(client.digest) {
            return Err(format!(
                "clients.{}.token: the same token as another client",
                client.name
            ));
        }
    }
    Ok(clients)
}

pub(super) fn one_line(err: &toml::de::Error) -> String {
    // The span, not the snippet: the snippet could show a token.
    let line = err.message().to_string();
    match err.span() {
        Some(span) => format!("{line} (at byte {})", span.start),
        None => line,
    }
}

/// `clients.alice.tokens_per_day: must be ...`: where, then what. The message is ours or serde's
/// (an unknown field, a table that is not one), neither of which quotes a value.
pub(super) fn at_path(prefix: &str, err: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let path = err.path().to_string();
    let place = match (prefix, path.as_str()) {
        (prefix, ".") => prefix.to_string(),
        ("", path) => path.to_string(),
        (prefix, path) => format!("{prefix}.{path}"),
    };
    let message = err.inner().message();
    if place.is_empty() {
        message.to_string()
    } else {
        format!("{place}: {message}")
    }
}

fn parse_client(name: &str, entry: toml::Value) -> Result<Client, String> {
    if !is_client_name(name) {
        return Err(format!(
            "clients.{}: a client name is 1 to 32 characters of A-Z a-z 0-9 _ . -",
            name.chars().take(40).collect::<String>()
        ));
    }
    let at = format!("clients.{name}");
    let entry: Entry = serde_path_to_error::deserialize(entry).map_err(|err| at_path(&at, &err))?;
    let digest = match (&entry.token, entry.token_sha256) {
        (Some(token), None) => digest(token.expose().as_bytes()),
        (None, Some(digest)) => digest,
        (Some(_), Some(_)) => {
            return Err(format!("{at}.token: give token or token_sha256, not both"));
        }
        (None, None) => return Err(format!("{at}.token: is required (or token_sha256)")),
    };
    let dollar_budget = entry.usd_per_day.is_some() || entry.usd_per_month.is_some();
    if entry.endpoints.is_some() && entry.models.is_none() && !dollar_budget {
        // Without a model list (or a dollar budget, which refuses what it cannot price) every
        // endpoint is open to the client: a list of endpoints alone would read as a restriction
        // that is not one.
        return Err(format!(
            "{at}.endpoints: is for a client with a models list or a dollar budget (without \
             either, every endpoint is open)"
        ));
    }
    Ok(Client {
        name: Arc::from(name),
        digest,
        token: entry.token,
        limits: ClientLimits {
            requests_per_minute: entry.requests_per_minute,
            tokens_per_minute: entry.tokens_per_minute,
            max_concurrent_requests: entry.max_concurrent_requests,
            tokens_per_day: entry.tokens_per_day,
            usd_per_day: entry.usd_per_day,
            usd_per_month: entry.usd_per_month,
            default_output_reservation: entry.default_output_reservation,
            models: entry.models,
            endpoints: entry.endpoints,
            expires_at: entry.expires_at,
            disabled: entry.disabled,
        },
    })
}

/// A field's value as TOML, for the parsers below to check and explain.
pub(super) fn value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<toml::Value, D::Error> {
    toml::Value::deserialize(deserializer)
}

fn token<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Secret>, D::Error> {
    match value(deserializer)? {
        toml::Value::String(text) if !text.trim().is_empty() => Ok(Some(Secret::new(text.trim()))),
        _ => Err(D::Error::custom("must be a non-empty string")),
    }
}

fn token_sha256<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<[u8; 32]>, D::Error> {
    value(deserializer)?
        .as_str()
        .and_then(hex_digest)
        .map(Some)
        .ok_or_else(|| D::Error::custom("must be 64 hex digits"))
}

/// A whole number of at least 1: a limit of 0 would refuse everything by accident (`disabled`
/// says that on purpose).
pub(super) fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match value(deserializer)?.as_integer() {
        Some(number) if number >= 1 => Ok(Some(number as u64)),
        _ => Err(D::Error::custom("must be a whole number of at least 1")),
    }
}

/// US dollars, a decimal number above 0 (`20`, `0.5`), kept as nano-dollars: a budget that
/// rounds to nothing would refuse everything by accident.
fn dollars<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Nanos>, D::Error> {
    let usd = match value(deserializer)? {
        toml::Value::Float(usd) => Some(usd),
        toml::Value::Integer(usd) => Some(usd as f64),
        _ => None,
    };
    usd.and_then(nanos_of_usd)
        .filter(|nanos| *nanos > 0)
        .map(Some)
        .ok_or_else(|| {
            D::Error::custom("must be a number of US dollars above 0, such as 20 or 0.5")
        })
}

fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    value(deserializer)?
        .as_bool()
        .ok_or_else(|| D::Error::custom("must be true or false"))
}

fn models<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    let accepted =
        || D::Error::custom("must be a list of model names, each exact or ending in one *");
    let value = value(deserializer)?;
    let list = value.as_array().ok_or_else(accepted)?;
    list.iter()
        .map(|item| match item.as_str() {
            Some(name)
                if !name.is_empty()
                    && !name.trim_end_matches('*').contains('*')
                    && name.matches('*').count() <= 1 =>
            {
                Ok(name.to_string())
            }
            _ => Err(accepted()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Canonical `/v1` paths, as the proxy compares them (no `%` escape, no empty, `.` or `..`
/// segment, no trailing `/`), each exact or a prefix ending in one `*`.
fn endpoints<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    let accepted = || {
        D::Error::custom(
            "must be a list of paths under /v1 as the proxy compares them (no %, no //, no . or \
             .. segment, no trailing /), each exact or ending in one *, such as \"/v1/batches*\"",
        )
    };
    let value = value(deserializer)?;
    let list = value.as_array().ok_or_else(accepted)?;
    list.iter()
        .map(|item| {
            item.as_str()
                .filter(|pattern| is_endpoint_pattern(pattern))
                .map(str::to_string)
                .ok_or_else(accepted)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn is_endpoint_pattern(pattern: &str) -> bool {
    let (path, prefix) = match pattern.strip_suffix('*') {
        Some(path) => (path, true),
        None => (pattern, false),
    };
    let Some(rest) = path
        .strip_prefix("/v1")
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    let (last, inner) = match segments.split_last() {
        Some((last, inner)) => (*last, inner),
        None => ("v1", &[][..]),
    };
    // The last segment may be empty only before a `*` (`/v1/threads/*`).
    (!last.is_empty() || prefix)
        && inner.iter().all(|segment| !segment.is_empty())
        && segments
            .iter()
            .all(|segment| !matches!(*segment, "." | ".."))
        && path
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && !b"%*?#\\".contains(&byte))
}

/// A TOML offset date-time (or a string) in UTC, such as `2027-01-01T00:00:00Z`.
fn date_time<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SystemTime>, D::Error> {
    let text = match value(deserializer)? {
        toml::Value::Datetime(datetime) => datetime.to_string(),
        toml::Value::String(text) => text,
        _ => String::new(),
    };
    humantime::parse_rfc3339(&text)
        .map(Some)
        .map_err(|_| D::Error::custom("must be a UTC date-time such as 2027-01-01T00:00:00Z"))
}

fn hex_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [clients.alice]
        token = "tok-alice"
        requests_per_minute = 60
        tokens_per_minute = 100000
        max_concurrent_requests = 4
        tokens_per_day = 2000000
        usd_per_day = 20
        usd_per_month = 250.5
        default_output_reservation = 1024
        models = ["gpt-4o-mini", "gpt-4o-*"]
        endpoints = ["/v1/batches*", "/v1/evals/eval_1/runs"]
        expires_at = 2027-01-01T00:00:00Z
        disabled = false

        [clients.bob]
        token_sha256 = "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92"
    "#;

    fn error(text: &str) -> String {
        parse(text).expect_err("the file should be rejected")
    }

    #[test]
    fn every_field_is_read() {
        let clients = parse(FULL).unwrap();
        let alice = clients.iter().find(|c| &*c.name == "alice").unwrap();
        assert_eq!(alice.limits.requests_per_minute, Some(60));
        assert_eq!(alice.limits.tokens_per_minute, Some(100_000));
        assert_eq!(alice.limits.max_concurrent_requests, Some(4));
        assert_eq!(alice.limits.tokens_per_day, Some(2_000_000));
        assert_eq!(alice.limits.usd_per_day, Some(20_000_000_000));
        assert_eq!(alice.limits.usd_per_month, Some(250_500_000_000));
        assert_eq!(alice.limits.output_reservation(), 1024);
        assert!(alice.limits.has_dollar_budget());
        assert!(alice.limits.allows_model("gpt-4o-mini"));
        assert!(alice.limits.allows_model("gpt-4o-2024-08-06"));
        assert!(!alice.limits.allows_model("gpt-4"));
        assert!(alice.limits.allows_endpoint("/v1/batches"));
        assert!(alice.limits.allows_endpoint("/v1/batches/batch_1/cancel"));
        assert!(alice.limits.allows_endpoint("/v1/evals/eval_1/runs"));
        assert!(!alice.limits.allows_endpoint("/v1/evals/eval_2/runs"));
        assert!(!alice.limits.allows_endpoint("/v1/evals/eval_1/runs/run_1"));
        assert_eq!(
            alice.limits.expires_at,
            Some(humantime::parse_rfc3339("2027-01-01T00:00:00Z").unwrap())
        );
        let bob = clients.iter().find(|c| &*c.name == "bob").unwrap();
        assert_eq!(bob.digest, digest(b"123456"));
        assert!(bob.token.is_none());
        assert!(bob.limits.allows_model("anything"));
        assert!(!bob.limits.allows_endpoint("/v1/batches"));
        assert!(!bob.limits.is_limited());
        assert!(!bob.limits.has_dollar_budget());
        assert_eq!(bob.limits.output_reservation(), DEFAULT_OUTPUT_RESERVATION);
    }

    #[test]
    fn a_dollar_budget_is_a_positive_amount_and_makes_the_body_read() {
        let limits = |fields: &str| parse(&format!("[clients.a]\ntoken=\"t\"\n{fields}"));
        let cents = limits("usd_per_month = 0.01").unwrap();
        assert_eq!(cents[0].limits.usd_per_month, Some(10_000_000));
        assert!(cents[0].limits.reads_body() && cents[0].limits.is_limited());
        for (field, value) in [
            ("usd_per_day", "0"),
            ("usd_per_day", "-5"),
            ("usd_per_day", "\"20\""),
            ("usd_per_day", "nan"),
            ("usd_per_day", "inf"),
            ("usd_per_month", "1e30"),
            // Less than a nano-dollar rounds to nothing.
            ("usd_per_month", "1e-12"),
        ] {
            let message = limits(&format!("{field} = {value}")).expect_err(value);
            assert_eq!(
                message,
                format!(
                    "clients.a.{field}: must be a number of US dollars above 0, such as 20 or 0.5"
                ),
                "{value}"
            );
        }
        for value in ["0", "-1", "1.5", "\"4096\""] {
            let message =
                limits(&format!("default_output_reservation = {value}")).expect_err(value);
            assert_eq!(
                message,
                "clients.a.default_output_reservation: must be a whole number of at least 1"
            );
        }
        // A dollar budget refuses the endpoints it cannot price unless they are listed.
        assert!(limits("usd_per_day = 1\nendpoints = [\"/v1/batches*\"]").is_ok());
    }

    #[test]
    fn errors_name_the_client_and_the_field_without_the_token() {
        let cases = [
            (
                "[clients.a]\ntoken=\"t\"\nrequests_per_minit=5",
                "clients.a.requests_per_minit",
            ),
            (
                "[clients.a]\ntoken=\"t\"\nrequests_per_minute=0",
                "clients.a.requests_per_minute",
            ),
            (
                "[clients.a]\ntoken=\"t\"\ntokens_per_day=\"lots\"",
                "clients.a.tokens_per_day",
            ),
            (
                "[clients.a]\ntoken=\"t\"\nmodels=[\"*x*\"]",
                "clients.a.models",
            ),
            (
                "[clients.a]\ntoken=\"t\"\nexpires_at=2027-01-01",
                "clients.a.expires_at",
            ),
            (
                "[clients.a]\ntoken_sha256=\"abc\"",
                "clients.a.token_sha256",
            ),
            ("[clients.a]\nrequests_per_minute=1", "clients.a.token"),
            ("[clients.\"bad name\"]\ntoken=\"t\"", "clients.bad name"),
            (
                "[clients.a]\ntoken=\"same-secret\"\n[clients.b]\ntoken=\"same-secret\"",
                "clients.b.token",
            ),
        ];
        for (text, named) in cases {
            let message = error(text);
            assert!(message.starts_with(named), "{text:?}: {message}");
            assert!(!message.contains("same-secret"), "{message}");
        }
        assert!(error("[clients.a\ntoken=").starts_with("is not valid TOML"));
        let unknown = error("[clients.a]\ntoken=\"t\"\nrequests_per_minit=5");
        assert!(
            unknown.contains("unknown field") && unknown.contains("requests_per_minute"),
            "names what is accepted: {unknown}"
        );
        let top = error("[client.a]\ntoken=\"t\"");
        assert!(top.starts_with("client: unknown field"), "{top}");
        let not_a_table = error("[clients]\na = 5");
        assert!(not_a_table.starts_with("clients.a: "), "{not_a_table}");
    }

    #[test]
    fn a_file_without_clients_is_refused_unless_it_allows_that() {
        for text in ["", "  \n# no one yet\n", "[clients]\n"] {
            let message = error(text);
            assert!(
                message.starts_with("has no clients") && message.contains("allow_empty = true"),
                "{text:?}: {message}"
            );
        }
        assert!(parse("allow_empty = true\n").unwrap().is_empty());
        assert!(parse("allow_empty = true\n[clients]\n").unwrap().is_empty());
        assert!(error("allow_empty = false\n").starts_with("has no clients"));
        let with_one = parse("allow_empty = true\n[clients.a]\ntoken = \"t\"\n").unwrap();
        assert_eq!(with_one.len(), 1);
        let not_a_boolean = error("allow_empty = \"yes\"\n[clients.a]\ntoken = \"t\"\n");
        assert!(
            not_a_boolean.starts_with("allow_empty: must be true or false"),
            "{not_a_boolean}"
        );
        // Below a client's table it is that client's field, and not one a client has.
        let misplaced = error("[clients.a]\ntoken = \"t\"\nallow_empty = true\n");
        assert!(
            misplaced.starts_with("clients.a.allow_empty: unknown field"),
            "{misplaced}"
        );
    }

    #[test]
    fn endpoints_are_canonical_v1_paths_for_a_client_with_a_model_list() {
        let with = |endpoints: &str| {
            parse(&format!(
                "[clients.a]\ntoken=\"t\"\nmodels=[\"m\"]\nendpoints={endpoints}"
            ))
        };
        for good in [
            r#"["/v1/batches"]"#,
            r#"["/v1/batches*"]"#,
            r#"["/v1/threads/*"]"#,
            r#"["/v1*", "/v1"]"#,
            "[]",
        ] {
            assert!(with(good).is_ok(), "{good}: {:?}", with(good).err());
        }
        for bad in [
            r#""/v1/batches""#,
            r#"["v1/batches"]"#,
            r#"["/v2/batches"]"#,
            r#"["/v1x"]"#,
            r#"["/v1/batches/"]"#,
            r#"["/v1//batches"]"#,
            r#"["/v1/%62atches"]"#,
            r#"["/v1/../admin*"]"#,
            r#"["/v1/./batches"]"#,
            r#"["/v1/*/runs"]"#,
            r#"["/v1/batches**"]"#,
            r#"["/v1/batches?x=1"]"#,
            r#"["/v1/bat ches"]"#,
            r#"[""]"#,
            "[5]",
        ] {
            let message = with(bad).expect_err(bad);
            assert!(
                message.starts_with("clients.a.endpoints: must be"),
                "{bad}: {message}"
            );
        }
        let alone = error("[clients.a]\ntoken=\"t\"\nendpoints=[\"/v1/batches\"]");
        assert!(
            alone.starts_with(
                "clients.a.endpoints: is for a client with a models list or a dollar budget"
            ),
            "{alone}"
        );
    }

    #[test]
    fn expiry_and_disabling_make_a_client_inactive() {
        let now = SystemTime::now();
        let mut limits = ClientLimits::default();
        assert!(limits.is_active(now));
        limits.expires_at = Some(now);
        assert!(!limits.is_active(now));
        limits.expires_at = None;
        limits.disabled = true;
        assert!(!limits.is_active(now));
    }
}
