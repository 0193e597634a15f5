//! Per-client limits, budgets and model lists. The [`Policy`] handle decides, before anything
//! goes upstream, whether a client's request may go; the [`Ticket`] it hands out holds the
//! request's charge until the answer ends, and then settles it with the tokens used.
//!
//! The limiter state sits behind the [`Limiter`] trait: in this process ([`MemoryLimiter`]) by
//! default; a shared backend can take its place without the routes noticing.

pub mod limiter;
pub mod memory;
pub mod redis;
pub mod request;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use warp::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Client;
use crate::error::ProxyError;
use crate::ops::metrics::Metrics;
pub use limiter::{ClientUsage, Limiter, Reason, Refusal, Standing, Window};
pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;

/// The limiter and what the routes need around it. Cloning is shallow.
#[derive(Clone)]
pub struct Policy(Arc<Inner>);

struct Inner {
    limiter: Arc<dyn Limiter>,
    metrics: Metrics,
}

impl Policy {
    pub fn new(limiter: Arc<dyn Limiter>, metrics: Metrics) -> Policy {
        Policy(Arc::new(Inner { limiter, metrics }))
    }

    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.0.limiter
    }

    /// The model check: `Ok` when the client may use `model` (or has no list).
    pub fn check_model(&self, client: &Client, model: Option<&str>) -> Result<(), ProxyError> {
        if client.limits.models.is_none() {
            return Ok(());
        }
        let (error, reason) = match model {
            None => (ProxyError::ModelRequired, Reason::ModelRequired),
            Some(model) if client.limits.allows_model(model) => return Ok(()),
            Some(_) => (ProxyError::ModelNotAllowed, Reason::Model),
        };
        self.0.metrics.limit_refusal(&client.name, reason.as_str());
        Err(error)
    }

    /// Admits the request or answers the refusal. A client without limits is always admitted,
    /// and counted all the same: `/admin/clients` shows everybody's usage.
    pub async fn admit(
        &self,
        client: &Arc<Client>,
        estimate: u64,
    ) -> Result<Ticket, warp::reply::Response> {
        match self
            .0
            .limiter
            .acquire(&client.name, &client.limits, estimate)
            .await
        {
            Ok((charge, standing)) => Ok(Ticket {
                limiter: self.0.limiter.clone(),
                client: client.clone(),
                charge,
                standing,
                used: None,
            }),
            Err(refusal) => {
                self.0
                    .metrics
                    .limit_refusal(&client.name, refusal.reason.as_str());
                Err(refusal_response(&refusal))
            }
        }
    }
}

/// A request's charge against its client's limits, held until its answer ends. Dropped without
/// [`Ticket::used`], it settles as having used no tokens (the upstream failed or refused).
pub struct Ticket {
    limiter: Arc<dyn Limiter>,
    /// The client as it was when the request was admitted: a reload does not change its rules.
    client: Arc<Client>,
    charge: limiter::Charge,
    standing: Standing,
    used: Option<u64>,
}

impl Ticket {
    pub fn estimate(&self) -> u64 {
        self.charge.tokens
    }

    /// The client's own `x-ratelimit-*` standing, for a client with limits.
    pub fn standing(&self) -> Option<Standing> {
        self.client.limits.is_limited().then_some(self.standing)
    }

    /// Records what the request used; the settlement happens when the ticket is dropped.
    pub fn used(&mut self, tokens: u64) {
        self.used = Some(tokens);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.limiter.settle(
            &self.client.name,
            &self.client.limits,
            self.charge,
            self.used.unwrap_or(0),
        );
    }
}

/// The names in the order `write_rate_limit_headers` fills them, built once: a name made per
/// call is checked byte by byte every time.
static RATE_LIMIT_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Puts the client's own `x-ratelimit-*` headers in place of whatever the upstream sent, which
/// describes the shared key's quota rather than this client's.
pub fn write_rate_limit_headers(headers: &mut HeaderMap, standing: &Standing) {
    let windows = [(0, standing.requests), (3, standing.tokens)];
    for (first, window) in windows {
        let names = &RATE_LIMIT_HEADERS[first..first + 3];
        let Some(window) = window else {
            // No limit of this kind: the upstream's figures for it go (a pass over the names
            // first costs less than three hashed removals, and most upstreams send none).
            if headers
                .keys()
                .any(|name| name.as_str().starts_with("x-ratelimit-"))
            {
                for name in names {
                    headers.remove(name);
                }
            }
            continue;
        };
        let values = [
            HeaderValue::from(window.limit),
            HeaderValue::from(window.remaining),
            // From the `String` itself: no second copy of its bytes.
            HeaderValue::try_from(openai_duration(window.reset))
                .unwrap_or_else(|_| HeaderValue::from_static("0s")),
        ];
        // `insert` replaces whatever the upstream sent under the name.
        for (name, value) in names.iter().zip(values) {
            headers.insert(name.clone(), value);
        }
    }
}

/// The 429 for a refusal, with `Retry-After` in whole seconds rounded up (so the request is
/// admitted by then, never before it).
pub fn refusal_response(refusal: &Refusal) -> warp::reply::Response {
    let retry_after = retry_after_secs(refusal.retry_after);
    let error = match refusal.reason {
        Reason::Budget => ProxyError::QuotaExceeded { retry_after },
        _ => ProxyError::RateLimited { retry_after },
    };
    let mut response = error.into_response();
    write_rate_limit_headers(response.headers_mut(), &refusal.standing);
    response
}

pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// OpenAI's form of the reset headers: `12s`, `59.999s`, `6m0s`, rounded up to milliseconds.
pub fn openai_duration(duration: Duration) -> String {
    let millis = duration
        .as_micros()
        .div_ceil(1000)
        .min(u128::from(u64::MAX)) as u64;
    let (minutes, rest) = (millis / 60_000, millis % 60_000);
    let mut text = String::with_capacity(16);
    let mut digits = itoa::Buffer::new();
    if minutes > 0 {
        text.push_str(digits.format(minutes));
        text.push('m');
    }
    text.push_str(digits.format(rest / 1000));
    let fraction = rest % 1000;
    if fraction != 0 {
        // Three places with the trailing zeros cut: 0.5s, 0.25s, 0.125s.
        let places = [fraction / 100, fraction / 10 % 10, fraction % 10];
        let kept = places.len() - places.iter().rev().take_while(|&&d| d == 0).count();
        text.push('.');
        for place in &places[..kept] {
            text.push(char::from(b'0' + *place as u8));
        }
    }
    text.push('s');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_are_written_the_openai_way() {
        assert_eq!(openai_duration(Duration::from_secs(12)), "12s");
        assert_eq!(openai_duration(Duration::from_millis(11_999)), "11.999s");
        assert_eq!(openai_duration(Duration::from_millis(500)), "0.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::ZERO), "0s");
        assert_eq!(openai_duration(Duration::from_millis(1_250)), "1.25s");
        assert_eq!(openai_duration(Duration::from_millis(60_010)), "1m0.01s");
        assert_eq!(openai_duration(Duration::from_micros(1)), "0.001s");
        assert_eq!(retry_after_secs(Duration::from_millis(11_001)), 12);
        assert_eq!(retry_after_secs(Duration::from_secs(12)), 12);
    }
}
