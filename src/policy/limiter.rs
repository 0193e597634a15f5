//! The limiter contract: one decision per request that checks every limit of a client and
//! charges them together, and a settlement when the request ends. The in-process backend is
//! [`super::memory::MemoryLimiter`]; a shared backend (Redis) implements the same trait.

use std::time::Duration;

use futures::future::BoxFuture;
use warp::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::ClientLimits;

/// One client's place against a per-minute limit, as the `x-ratelimit-*` headers tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is wholly available again.
    pub reset: Duration,
}

/// The per-minute windows of the limits a client has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// The names in the order `Standing::write_headers` fills them, built once: a name made per
/// call is checked byte by byte every time.
static RATE_LIMIT_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

impl Standing {
    /// Writes the standing as OpenAI's `x-ratelimit-*` headers, in place of whatever the upstream
    /// sent under those names (its figures are the shared key's, not this client's). Used on the
    /// answers that pass and on the 429s of `crate::error` alike.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let windows = [(0, self.requests), (3, self.tokens)];
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

/// Which limit refused a request; also the `reason` label of the refusal metric.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    Requests,
    Tokens,
    Concurrency,
    Budget,
    Model,
    ModelRequired,
    /// An endpoint that generates without a readable model, outside the client's `endpoints`.
    Endpoint,
    /// A model named twice where one is read.
    DuplicateModel,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requests => "requests_per_minute",
            Reason::Tokens => "tokens_per_minute",
            Reason::Concurrency => "max_concurrent_requests",
            Reason::Budget => "tokens_per_day",
            Reason::Model => "model_not_allowed",
            Reason::ModelRequired => "model_required",
            Reason::Endpoint => "endpoint_not_allowed",
            Reason::DuplicateModel => "invalid_request",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// When the same request would be admitted, from the limiter's state.
    pub retry_after: Duration,
    pub standing: Standing,
}

/// What `acquire` charged, handed back to `settle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    /// The UTC day (days since 1970-01-01) the tokens were charged to.
    pub day: u64,
    /// The backend's own reference to the place held (the Redis slot); 0 for none.
    pub slot: u64,
}

/// What `/admin/clients` shows of a client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientUsage {
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub tokens_today: u64,
    pub in_flight: u64,
}

/// Today's token counts of every client, as kept across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    pub day: u64,
    pub tokens: Vec<(String, u64)>,
}

pub trait Limiter: Send + Sync + 'static {
    /// Checks every limit `limits` sets for `client`; when all pass, charges one request, a
    /// place in its concurrency and `estimate` tokens, all at once (a refusal charges nothing).
    fn acquire<'a>(
        &'a self,
        client: &'a str,
        limits: &'a ClientLimits,
        estimate: u64,
    ) -> BoxFuture<'a, Result<(Charge, Standing), Refusal>>;

    /// Replaces the charged estimate by the tokens the request used, and gives back its place.
    /// Called from `Drop`, so it must not wait: a shared backend sends it off in the background.
    fn settle(&self, client: &str, limits: &ClientLimits, charge: Charge, used: u64);

    fn usage<'a>(&'a self, client: &'a str) -> BoxFuture<'a, ClientUsage>;

    /// Sends what `settle` left for later (a shared backend batches settlements); called once
    /// the server has drained, so that the last requests' settlements are not lost.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// The daily counts, for a backend that keeps them in this process; `None` otherwise.
    fn budgets(&self) -> Option<Budgets> {
        None
    }

    /// Puts counts read back at start-up in place (counts of another day are ignored).
    fn restore_budgets(&self, _budgets: Budgets) {}

    /// Bumped by every change to the daily counts: the state writer skips a write when it did
    /// not move.
    fn budget_generation(&self) -> u64 {
        0
    }
}
