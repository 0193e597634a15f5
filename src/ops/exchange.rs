//! What a handler tells the access log and the metrics about an exchange, carried in the
//! response's extensions from the route handlers to the server loop that writes the access line.

use std::sync::Arc;
use std::time::Duration;

use crate::vocab::{Nanos, Usage};

/// Set on proxied and cached answers; absent on the proxy's own errors.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The caller's label: the `ALLOWED_TOKENS` name, a short hash of the token, or `anonymous`.
    pub client: Arc<str>,
    /// Time spent waiting for the upstream's response headers, if the upstream was asked.
    pub upstream_wait: Option<Duration>,
    /// Whether the answer is a server-sent-event stream.
    pub stream: bool,
    /// Which upstream answered, after how many attempts, leaving which; `None` when no upstream
    /// was asked.
    pub way: Option<Arc<dyn Way>>,
}

/// A forwarded request's way through the upstreams, for the access line. The value is kept
/// until the access line is written, after the answer's last byte: the answering upstream counts
/// the request in flight until it is dropped.
pub trait Way: Send + Sync + std::fmt::Debug {
    fn upstream(&self) -> &str;
    fn attempts(&self) -> u32;
    /// `<upstream>:<reason>` of each upstream left, comma-separated.
    fn failover(&self) -> Option<&str>;
}

/// The model and token counts of an exchange, for the access line. Set by the `/v1` handler; what
/// the answer showed arrives when its body ends, which is before the access line is written (the
/// body is dropped before the record that wraps it).
#[derive(Clone, Debug, Default)]
pub struct Spend {
    /// The model the request named, when the proxy read the body (clients with a model list or
    /// token limits).
    pub model: Option<Arc<str>>,
    pub answered: Arc<parking_lot::Mutex<Answered>>,
}

/// What the answer's body showed by its end.
#[derive(Clone, Debug, Default)]
pub struct Answered {
    pub usage: Option<Usage>,
    /// The model the answer names, looked for when the request's body was not read.
    pub model: Option<Arc<str>>,
    /// What the request cost: `None` when it was not priced (no usage, or no price for its
    /// model).
    pub cost: Option<Nanos>,
}

impl Spend {
    /// The model for the access line: the one the request named, else the answer's.
    pub fn model(&self) -> Option<Arc<str>> {
        self.model
            .clone()
            .or_else(|| self.answered.lock().model.clone())
    }
}

/// A model name as the access line shows it. It comes from the caller's body or the upstream's
/// answer, so only a short run of the characters model names use is kept: a newline or a quote
/// there would forge log lines.
pub fn loggable(model: &str) -> Arc<str> {
    const MAX: usize = 64;
    if model.len() <= MAX && model.bytes().all(is_loggable) {
        // The usual name, kept whole: one allocation, no per-character rewrite.
        return Arc::from(model);
    }
    let kept: String = model
        .chars()
        .take(MAX)
        .map(|c| {
            if u8::try_from(c).is_ok_and(is_loggable) {
                c
            } else {
                '?'
            }
        })
        .collect();
    Arc::from(kept)
}

fn is_loggable(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'/' | b'-' | b'@' | b'+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_cannot_forge_a_log_line() {
        assert_eq!(&*loggable("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(
            &*loggable("m\nPOST /v1/x status=200"),
            "m?POST?/v1/x?status?200"
        );
        assert_eq!(loggable(&"x".repeat(500)).len(), 64);
    }
}
