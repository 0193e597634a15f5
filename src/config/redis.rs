//! `REDIS_URL`, `REDIS_TIMEOUT_MS`, `REDIS_FALLBACK_REPLICAS`: where the state shared by
//! replicas lives and how long a request may wait for it.

use std::fmt;
use std::time::Duration;

use reqwest::Url;

use super::Secret;
use super::env::Settings;
use super::error::{ConfigError, invalid};
use super::values::positive;

/// The state shared across replicas.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedStateConfig {
    /// `REDIS_URL`; `None`: every replica keeps its own state.
    pub redis: Option<RedisUrl>,
    /// `REDIS_TIMEOUT_MS`: the longest any request waits for Redis.
    pub timeout: Duration,
    /// `REDIS_FALLBACK_REPLICAS`: while Redis is unreachable, each replica enforces a shared
    /// limit divided by this (rounded up, at least 1).
    pub fallback_replicas: u32,
}

impl fmt::Debug for SharedStateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStateConfig")
            .field("redis", &self.redis.as_ref().map(RedisUrl::display))
            .field("timeout", &self.timeout)
            .field("fallback_replicas", &self.fallback_replicas)
            .finish()
    }
}

/// A validated `REDIS_URL`. The whole URL is a secret (it may hold a password); `display` is
/// what logs show: the URL with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub url: Secret,
    /// The password as written in the URL and percent-decoded, for redaction.
    pub password: Vec<Secret>,
    display: String,
}

impl RedisUrl {
    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn is_tls(&self) -> bool {
        self.url.expose().starts_with("rediss://")
    }
}

pub(super) fn shared_state<F: Fn(&str) -> Option<String>>(
    settings: &Settings<F>,
) -> Result<SharedStateConfig, ConfigError> {
    let redis = settings
        .set("REDIS_URL")
        .map(|url| redis_url(&url))
        .transpose()?;
    let timeout = Duration::from_millis(positive(
        "REDIS_TIMEOUT_MS",
        settings.value("REDIS_TIMEOUT_MS"),
    )?);
    let fallback_replicas = positive(
        "REDIS_FALLBACK_REPLICAS",
        settings.value("REDIS_FALLBACK_REPLICAS"),
    )?
    .try_into()
    .map_err(|_| invalid("REDIS_FALLBACK_REPLICAS", "is too large"))?;
    Ok(SharedStateConfig {
        redis,
        timeout,
        fallback_replicas,
    })
}

/// `redis://[user][:password@]host[:port][/db]` or `rediss://` (TLS). No message echoes the
/// value: it may hold a password.
fn redis_url(raw: &str) -> Result<RedisUrl, ConfigError> {
    const ACCEPTED: &str = "accepted: redis://host:6379/0, rediss://host:6380/0 for TLS, \
                            redis://:password@host:6379/0";
    let url =
        Url::parse(raw).map_err(|_| invalid("REDIS_URL", format!("is not a URL ({ACCEPTED})")))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(invalid(
            "REDIS_URL",
            format!("has the scheme {:?} ({ACCEPTED})", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("REDIS_URL", format!("names no host ({ACCEPTED})")));
    }
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() && path.parse::<u16>().is_err() {
        return Err(invalid(
            "REDIS_URL",
            format!("has a path that is not a database number ({ACCEPTED})"),
        ));
    }
    // The redis crate's own parsing, so that what it would refuse later is refused now; only the
    // kind of error is shown, its message could quote the URL.
    redis::Client::open(raw).map_err(|err| {
        invalid(
            "REDIS_URL",
            format!("is not usable ({:?}; {ACCEPTED})", err.kind()),
        )
    })?;
    let mut password = Vec::new();
    if let Some(written) = url.password() {
        password.push(Secret::new(written));
        if let Ok(decoded) = percent_decode(written)
            && decoded != written
        {
            password.push(Secret::new(decoded));
        }
    }
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Cannot fail: the URL has a host, so it can carry a password.
        let _ = shown.set_password(Some("***"));
    }
    Ok(RedisUrl {
        url: Secret::new(raw),
        password,
        display: shown.to_string(),
    })
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|&b| (b as char).to_digit(16))
                .map(|d| d as u8)
        };
        match (bytes[index], hex(index + 1), hex(index + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                index += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<SharedStateConfig, ConfigError> {
        shared_state(&Settings::new(|name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        }))
    }

    #[test]
    fn without_redis_url_state_is_local_with_the_documented_defaults() {
        let config = parse(&[]).unwrap();
        assert!(config.redis.is_none());
        assert_eq!(config.timeout, Duration::from_millis(50));
        assert_eq!(config.fallback_replicas, 1);
    }

    #[test]
    fn redis_urls_are_checked_and_never_echoed() {
        let config = parse(&[
            (
                "REDIS_URL",
                "rediss://user:p%40ss-word@redis.example:6380/2",
            ),
            ("REDIS_TIMEOUT_MS", "20"),
            ("REDIS_FALLBACK_REPLICAS", "3"),
        ])
        .unwrap();
        let redis = config.redis.as_ref().unwrap();
        assert!(redis.is_tls());
        assert_eq!(redis.display(), "rediss://user:***@redis.example:6380/2");
        let passwords: Vec<&str> = redis.password.iter().map(Secret::expose).collect();
        assert_eq!(passwords, ["p%40ss-word", "p@ss-word"]);
        assert_eq!(config.timeout, Duration::from_millis(20));
        assert_eq!(config.fallback_replicas, 3);
        let logged = format!("{config:?}");
        assert!(!logged.contains("ss-word"), "{logged}");
        assert!(parse(&[("REDIS_URL", "redis://127.0.0.1:6379")]).is_ok());

        for bad in [
            "http://:hunter2@host:6379",
            "127.0.0.1:6379",
            "redis://:hunter2@host:6379/zero",
            "redis://:hunter2@:6379",
        ] {
            let err = parse(&[("REDIS_URL", bad)]).unwrap_err();
            assert_eq!(err.variable, "REDIS_URL", "{bad}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        for variable in ["REDIS_TIMEOUT_MS", "REDIS_FALLBACK_REPLICAS"] {
            for bad in ["0", "-1", "fast"] {
                assert_eq!(parse(&[(variable, bad)]).unwrap_err().variable, variable);
            }
        }
    }
}
