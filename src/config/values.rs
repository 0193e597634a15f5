//! Parsing single values, each failure naming its variable and the accepted values. Nothing here
//! echoes a value that could be a secret or carry credentials.

use std::collections::HashMap;
use std::path::Path;

use reqwest::Url;

use super::ConfigError;

pub(super) fn invalid(variable: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable: variable.to_string(),
        message: message.into(),
    }
}

/// `TARGET_HOST`: an absolute http(s) URL, parsed once here; a trailing slash is dropped so that
/// request paths can be appended as they are.
pub(super) fn target_host(value: Option<&str>, default: &str) -> Result<Url, ConfigError> {
    const ACCEPTED: &str = "must be an absolute http:// or https:// URL, optionally with a path \
                            prefix, such as https://api.openai.com or https://host/openai";
    let raw = value.unwrap_or(default);
    // The value is not echoed back: a URL may carry credentials.
    let mut url = Url::parse(raw).map_err(|_| invalid("TARGET_HOST", ACCEPTED))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid("TARGET_HOST", ACCEPTED));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "TARGET_HOST",
            "must not contain user:password@; put the upstream key in AUTH_BEARER",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "TARGET_HOST",
            "must not contain a query string or fragment",
        ));
    }
    let prefix = url.path().trim_end_matches('/').to_string();
    url.set_path(&prefix);
    Ok(url)
}

/// A whole number of at least 1 (seconds, bytes or requests): zero would disable a safety limit
/// by accident.
pub(super) fn positive(
    variable: &str,
    value: Option<String>,
    default: u64,
) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) => match value.parse::<u64>() {
            Ok(number) if number >= 1 => Ok(number),
            _ => Err(invalid(
                variable,
                format!("{value:?} is not a whole number of at least 1"),
            )),
        },
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

/// The variables of a `.env`-style file; a missing file has none.
pub(super) fn env_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let name = path.display().to_string();
    let entries = dotenvy::from_path_iter(path)
        .map_err(|err| invalid(&name, format!("cannot be read: {err}")))?;
    entries
        .map(|entry| entry.map_err(|err| invalid(&name, format!("cannot be parsed: {err}"))))
        .collect()
}
