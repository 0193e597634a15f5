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
    loggable_as(model, None)
}

/// [`loggable`], sharing `known` (a name the configuration holds already) when the model is
/// that very name and shown whole: no allocation.
pub fn loggable_as(model: &str, known: Option<&Arc<str>>) -> Arc<str> {
    if model.len() <= MAX_LOGGED && model.bytes().all(is_loggable) {
        // The usual name, kept whole: one allocation at most, no per-character rewrite.
        return match known {
            Some(known) if **known == *model => known.clone(),
            _ => Arc::from(model),
        };
    }
    let kept: String = model
        .chars()
        .take(MAX_LOGGED)
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

/// The characters of a model name the access line shows at most.
const MAX_LOGGED: usize = 64;

fn is_loggable(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'/' | b'-' | b'@' | b'+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_name_is_shared_only_when_it_is_the_model_shown_whole() {
        let known: Arc<str> = Arc::from("gpt-4o-mini");
        assert!(Arc::ptr_eq(
            &loggable_as("gpt-4o-mini", Some(&known)),
            &known
        ));
        let other = loggable_as("gpt-4o", Some(&known));
        assert_eq!(&*other, "gpt-4o");
        let odd: Arc<str> = Arc::from("m\nx");
        let shown = loggable_as("m\nx", Some(&odd));
        assert_eq!(&*shown, "m?x");
        assert!(!Arc::ptr_eq(&shown, &odd));
    }

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
