//! Timeouts and size limits: what keeps one bad peer from holding the proxy's resources.

use std::time::Duration;

use super::env::Settings;
use super::error::{ConfigError, invalid};
use super::values;

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

impl Limits {
    pub(super) fn parse<F: Fn(&str) -> Option<String>>(
        settings: &Settings<F>,
    ) -> Result<Limits, ConfigError> {
        let seconds =
            |name: &str| values::positive(name, settings.value(name)).map(Duration::from_secs);
        Ok(Limits {
            upstream_connect_timeout: seconds("UPSTREAM_CONNECT_TIMEOUT_SECS")?,
            upstream_timeout: seconds("UPSTREAM_TIMEOUT_SECS")?,
            stream_idle_timeout: seconds("STREAM_IDLE_TIMEOUT_SECS")?,
            header_read_timeout: seconds("HEADER_READ_TIMEOUT_SECS")?,
            shutdown_grace: seconds("SHUTDOWN_GRACE_SECS")?,
            max_body_bytes: values::positive("MAX_BODY_BYTES", settings.value("MAX_BODY_BYTES"))?,
            max_concurrent_requests: values::positive(
                "MAX_CONCURRENT_REQUESTS",
                settings.value("MAX_CONCURRENT_REQUESTS"),
            )?
            .try_into()
            .map_err(|_| invalid("MAX_CONCURRENT_REQUESTS", "is too large"))?,
            sse_keepalive: values::seconds_or_off(
                "SSE_KEEPALIVE_SECS",
                settings.value("SSE_KEEPALIVE_SECS"),
            )?,
        })
    }
}
