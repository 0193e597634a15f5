//! Where a client stands against its per-minute limits, and how OpenAI's `x-ratelimit-*` headers
//! say it: the limiter computes it (policy), the answers that pass and the 429s (error) write it.

use std::time::Duration;

use warp::http::{HeaderMap, HeaderName, HeaderValue};

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

/// A limit a single request's token estimate (or, for the dollar budgets, its reservation) can
/// be larger than: such a request can never be admitted, whatever the client has used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenLimit {
    PerMinute,
    PerDay,
    UsdPerDay,
    UsdPerMonth,
}
