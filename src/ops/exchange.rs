//! What a handler tells the access log and the metrics about an exchange, carried in the
//! response's extensions from the route handlers to the server loop that writes the access line.

use std::sync::Arc;
use std::time::Duration;

/// Set on proxied and cached answers; absent on the proxy's own errors.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The caller's label: the `ALLOWED_TOKENS` name, a short hash of the token, or `anonymous`.
    pub client: Arc<str>,
    /// Time spent waiting for the upstream's response headers, if the upstream was asked.
    pub upstream_wait: Option<Duration>,
    /// Whether the answer is a server-sent-event stream.
    pub stream: bool,
}

/// The model and token counts of an exchange, for the access line. Set by the `/v1` handler; the
/// counts arrive when the answer's body ends, which is before the access line is written (the
/// body is dropped before the record that wraps it).
#[derive(Clone, Debug, Default)]
pub struct Spend {
    /// The model the request named, when the proxy read the body (clients with a model list or
    /// token limits).
    pub model: Option<Arc<str>>,
    pub usage: Arc<parking_lot::Mutex<Option<crate::vocab::Usage>>>,
}
