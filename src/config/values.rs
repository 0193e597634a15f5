//! Parsing single values, each failure naming its variable and the accepted values. Nothing here
//! echoes a value that could be a secret or carry credentials.

use std::time::Duration;

use reqwest::Url;
use url::form_urlencoded;
use warp::http::HeaderName;

use super::error::{ConfigError, invalid};

/// Where the settings a base URL must not carry are written instead, for its error's hint.
pub(super) struct Elsewhere {
    pub keys: &'static str,
    pub query: &'static str,
}

/// The environment's upstream: its key in `AUTH_BEARER`, its query in `UPSTREAM_QUERY`.
pub(super) const IN_THE_ENVIRONMENT: Elsewhere = Elsewhere {
    keys: "AUTH_BEARER",
    query: "UPSTREAM_QUERY",
};

/// `TARGET_HOST`, `TARGET_BASE_URL` or an upstream's `base_url`: an absolute http(s) URL, parsed
/// once here, without credentials, query or fragment; a trailing slash is dropped so that paths
/// can be appended. `variable` is what the error names.
pub(super) fn upstream_base(
    variable: &str,
    raw: &str,
    example: &str,
    elsewhere: &Elsewhere,
) -> Result<Url, ConfigError> {
    let accepted = format!("must be an absolute http:// or https:// URL, such as {example}");
    // The value is not echoed back: a URL may carry credentials.
    let mut url = Url::parse(raw).map_err(|_| invalid(variable, accepted.clone()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(variable, accepted));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            variable,
            format!(
                "must not contain user:password@; put the upstream key in {}",
                elsewhere.keys
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            variable,
            format!(
                "must not contain a query string or fragment; put query parameters such as \
                 api-version=2024-10-21 in {}",
                elsewhere.query
            ),
        ));
    }
    let prefix = url.path().trim_end_matches('/').to_string();
    url.set_path(&prefix);
    Ok(url)
}

/// `UPSTREAM_QUERY` or an upstream's `query` (`variable`, for the error): `name=value` pairs
/// joined by `&`, as in a URL. Kept in its wire form, and the names decoded, so that a caller's
/// parameter of the same name can be dropped.
pub(super) fn upstream_query(
    variable: &str,
    value: Option<String>,
) -> Result<Option<UpstreamQuery>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.strip_prefix('?').unwrap_or(&value);
    let mut names = Vec::new();
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (name, parameter) in form_urlencoded::parse(value.as_bytes()) {
        if name.is_empty() {
            return Err(invalid(
                variable,
                "has a parameter without a name (accepted: name=value pairs joined by &, such \
                 as api-version=2024-10-21)",
            ));
        }
        encoded.append_pair(&name, &parameter);
        names.push(name.into_owned());
    }
    if names.is_empty() {
        return Ok(None);
    }
    Ok(Some(UpstreamQuery {
        encoded: encoded.finish(),
        names,
    }))
}

/// Query parameters added to every upstream request. Some providers take their key this way
/// (`key=...`), so the values are never printed: `Debug` shows the names only.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamQuery {
    /// The pairs as they go on the wire, `a=1&b=2`.
    pub encoded: String,
    /// The decoded names, for dropping the caller's parameters of the same name.
    pub names: Vec<String>,
}

impl std::fmt::Debug for UpstreamQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamQuery")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// A header name for a variable, or an error naming it.
pub(super) fn header_name(variable: &str, name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        invalid(
            variable,
            format!("{name:?} is not a valid HTTP header name"),
        )
    })
}

/// A whole number of seconds that may be 0, meaning "off".
pub(super) fn seconds_or_off(
    variable: &str,
    value: Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        None => Ok(None),
        Some(value) => match value.parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(seconds) => Ok(Some(Duration::from_secs(seconds))),
            _ => Err(invalid(
                variable,
                format!("{value:?} is not a whole number of seconds (0: off)"),
            )),
        },
    }
}

/// A whole number of at least 1 (seconds, bytes or requests): zero would disable a safety limit
/// by accident. `None` only for a variable the table gives no default, which is a bug.
pub(super) fn positive(variable: &str, value: Option<String>) -> Result<u64, ConfigError> {
    let Some(value) = value else {
        return Err(invalid(variable, "has no value and no default"));
    };
    match value.parse::<u64>() {
        Ok(number) if number >= 1 => Ok(number),
        _ => Err(invalid(
            variable,
            format!("{value:?} is not a whole number of at least 1"),
        )),
    }
}

pub(super) fn boolean(variable: &str, value: Option<String>) -> Result<bool, ConfigError> {
    match value.map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no" | "off") => Ok(false),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some(other) => Err(invalid(
            variable,
            format!("{other:?} is not a boolean (accepted: true/false, 1/0, yes/no, on/off)"),
        )),
    }
}

/// Names become metric labels: short, and from a character set no dashboard has to escape.
pub fn is_client_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

/// `WORKER_THREADS`: a whole number from 1 to 1024; unset: `None` (one per core).
pub(super) fn worker_threads(value: Option<String>) -> Result<Option<usize>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(threads @ 1..=1024) => Ok(Some(threads)),
        _ => Err(invalid(
            "WORKER_THREADS",
            format!("{value:?} is not a whole number from 1 to 1024 (unset: one per core)"),
        )),
    }
}
