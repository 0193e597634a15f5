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
