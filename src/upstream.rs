//! Talking to the upstream: header hygiene, the key swap, sending, and forwarding the answer.

use std::error::Error as _;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use warp::Buf;
use warp::Reply;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

use reqwest::Url;

use crate::error::ProxyError;
use crate::metrics::UpstreamFailure;
use crate::state::AppState;
use crate::streams::{GuardedBody, LimitedBody, SecretMask, caused_by_body_limit, mask_secret};
use crate::usage::UsageMeter;

/// Headers that describe one connection, not the message (RFC 9110 7.6.1, plus the older
/// proxy-* ones): they are dropped in both directions, as are any names listed in `Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those named in `Connection`, in place: cheaper than copying
/// every end-to-end header into a new map.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    // One pass over the names present, then removals only for those found: most requests carry
    // none of these, and a removal is a hash lookup.
    let hop = HOP_BY_HOP;
    let mut present = [false; 9];
    for key in headers.keys() {
        for (index, name) in hop.iter().enumerate() {
            if key == name {
                present[index] = true;
            }
        }
    }
    for (index, name) in hop.into_iter().enumerate() {
        if present[index] {
            headers.remove(name);
        }
    }
}

/// The headers sent upstream: the caller's end-to-end headers without its credentials or `Host`,
/// plus the upstream key.
pub fn request_headers(
    mut headers: HeaderMap,
    caller_token_header: &HeaderName,
    upstream_authorization: &HeaderValue,
) -> HeaderMap {
    // The proxy, not the caller, decides how the upstream body is framed; a length next to
    // `Transfer-Encoding` is exactly what request smuggling feeds on.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(caller_token_header);
    // `100-continue` is negotiated with the caller by our own server; hyper's client cannot
    // honour it towards the upstream.
    headers.remove(header::EXPECT);
    headers.insert(header::AUTHORIZATION, upstream_authorization.clone());
    headers
}

/// The headers sent back to the caller: the upstream's, less the hop-by-hop ones, with the
/// upstream key masked wherever an upstream echoed it.
pub fn response_headers(mut headers: HeaderMap, upstream_key: &[u8]) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for value in headers.values_mut() {
        if let Some(masked) = mask_secret(value.as_bytes(), upstream_key) {
            *value = HeaderValue::from_maybe_shared(masked.freeze())
                .unwrap_or_else(|_| HeaderValue::from_static("***"));
        }
    }
    headers
}

/// `TARGET_HOST` + the caller's path + its query string, exactly as received (the URL parser
/// percent-encodes what the wire form cannot carry).
///
/// Paths with `.`/`..` segments (plain or percent-encoded) or backslashes are refused: URL
/// normalisation here or upstream would resolve them, and `/v1/../x` must not reach anything
/// outside the prefix with our key attached.
pub fn upstream_url(target: &Url, path: &str, query: Option<&str>) -> Result<Url, ProxyError> {
    if !path.starts_with('/') || path.split('/').any(is_dot_segment) || has_backslash(path) {
        return Err(ProxyError::InvalidPath);
    }
    // Only the path and query are set on a copy of the parsed base: parsing the whole URL per
    // request (host normalisation included) was a sixth of the proxy's CPU per request.
    let mut url = target.clone();
    let prefix = target.path().trim_end_matches('/');
    if prefix.is_empty() {
        url.set_path(path);
    } else {
        let mut full = String::with_capacity(prefix.len() + path.len());
        full.push_str(prefix);
        full.push_str(path);
        url.set_path(&full);
    }
    url.set_query(query);
    Ok(url)
}

fn is_dot_segment(segment: &str) -> bool {
    // "." or ".." with any dot optionally written as %2e / %2E; at most 6 bytes.
    let mut rest = segment.as_bytes();
    if rest.is_empty() || rest.len() > 6 {
        return false;
    }
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e'
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots <= 2
}

fn has_backslash(path: &str) -> bool {
    let bytes = path.as_bytes();
    memchr::memchr2(b'\\', b'%', bytes).is_some()
        && (bytes.contains(&b'\\')
            || bytes
                .windows(3)
                .any(|w| w[0] == b'%' && w[1] == b'5' && (w[2] | 0x20) == b'c'))
}

/// Whether a request carries a body worth streaming upstream. Without one, no body is sent at all,
/// so a `GET` does not go out as an empty chunked message.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// The caller's declared `Content-Length`, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Streams the caller's body upstream as it arrives, cut off past `MAX_BODY_BYTES`.
pub fn request_body<S, B>(state: &AppState, body: S) -> reqwest::Body
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let body = LimitedBody::new(
        Box::pin(body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining()))),
        state.config.limits.max_body_bytes,
    );
    if state.config.debug_mode {
        let state = state.clone();
        reqwest::Body::wrap_stream(body.inspect_ok(move |chunk| {
            log::debug!(
                "request body chunk: {}",
                state.mask(&String::from_utf8_lossy(chunk))
            );
        }))
    } else {
        reqwest::Body::wrap_stream(body)
    }
}

/// Sends one request upstream and waits for its response headers.
pub async fn send(
    state: &AppState,
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<reqwest::Body>,
) -> Result<reqwest::Response, ProxyError> {
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "upstream request: {method} {} headers: {}",
            url.path(),
            state.describe_headers(&headers)
        );
    }
    let timeout = state.config.limits.upstream_timeout;
    let mut request = state.client.request(method, url).headers(headers);
    if let Some(body) = body {
        request = request.body(body);
    }
    match tokio::time::timeout(timeout, request.send()).await {
        Err(_) => {
            log::error!(
                "upstream sent no response headers within {}s (UPSTREAM_TIMEOUT_SECS)",
                timeout.as_secs()
            );
            state.metrics.upstream_failure(UpstreamFailure::Timeout);
            Err(ProxyError::GatewayTimeout)
        }
        Ok(Err(err)) if caused_by_body_limit(&err) => {
            log::info!("request body over MAX_BODY_BYTES: upstream request aborted");
            Err(ProxyError::PayloadTooLarge)
        }
        Ok(Err(err)) => {
            log::error!("upstream request failed: {}", error_chain(&err));
            let (kind, error) = if err.is_timeout() {
                (UpstreamFailure::Timeout, ProxyError::GatewayTimeout)
            } else if err.is_connect() {
                (UpstreamFailure::Connect, ProxyError::BadGateway)
            } else {
                (UpstreamFailure::Reset, ProxyError::BadGateway)
            };
            state.metrics.upstream_failure(kind);
            Err(error)
        }
        Ok(Ok(response)) => {
            record_status(state, response.status());
            Ok(response)
        }
    }
}

/// Counts upstream answers that are errors.
fn record_status(state: &AppState, status: StatusCode) {
    if status.is_server_error() {
        state.metrics.upstream_failure(UpstreamFailure::Status5xx);
    } else if status.is_client_error() {
        state.metrics.upstream_failure(UpstreamFailure::Status4xx);
    }
}

/// warp needs response streams to be `Sync` as well as `Send`.
type UpstreamBody = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send + Sync>>;

/// The upstream's answer as the caller's response: same status, end-to-end headers, and the
/// body forwarded chunk by chunk as it arrives, bytes untouched, under the idle watchdog.
/// Non-2xx bodies go through the key mask: an upstream may echo the credentials it rejected.
/// With `usage_client`, the `usage` object of a successful answer is counted for that client.
pub async fn into_reply(
    state: &AppState,
    mut upstream: reqwest::Response,
    usage_client: Option<Arc<str>>,
) -> warp::reply::Response {
    let status = upstream.status();
    let upstream_key = state.key_to_mask();
    let headers = response_headers(std::mem::take(upstream.headers_mut()), upstream_key);
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "upstream response: {status} headers: {}",
            state.describe_headers(&headers)
        );
    }
    let sse = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
        // An error event cannot be added to a body whose length was declared.
        && !headers.contains_key(header::CONTENT_LENGTH);
    let mut headers = headers;
    if !status.is_success()
        && declared_length(&headers).is_some_and(|length| length <= SMALL_ERROR_BODY)
    {
        return small_error_reply(state, status, headers, upstream).await;
    }
    let mut body: UpstreamBody = Box::pin(upstream.bytes_stream());
    if !status.is_success() {
        // Masking may change the length.
        headers.remove(header::CONTENT_LENGTH);
        body = Box::pin(SecretMask::new(body, Bytes::copy_from_slice(upstream_key)));
    } else if let Some(client) = usage_client {
        body = Box::pin(UsageMeter::new(body, state.metrics.clone(), client));
    }
    if state.config.debug_mode {
        let state = state.clone();
        body = Box::pin(body.inspect(move |chunk| match chunk {
            Ok(chunk) => log::debug!(
                "response body chunk: {}",
                state.mask(&String::from_utf8_lossy(chunk))
            ),
            Err(err) => log::debug!("response body failed: {}", error_chain(err)),
        }));
    }
    let idle = state.config.limits.stream_idle_timeout;
    let guarded = GuardedBody::new(body, idle, sse, state.metrics.clone());
    let mut reply = warp::reply::stream(guarded).into_response();
    *reply.status_mut() = status;
    *reply.headers_mut() = headers;
    reply
}

/// Error bodies up to this size are read whole, so that when they hold no secret they go out
/// exactly as the upstream framed them, `Content-Length` included.
const SMALL_ERROR_BODY: u64 = 64 * 1024;

async fn small_error_reply(
    state: &AppState,
    status: StatusCode,
    mut headers: HeaderMap,
    upstream: reqwest::Response,
) -> warp::reply::Response {
    let read = tokio::time::timeout(state.config.limits.stream_idle_timeout, upstream.bytes());
    let mut body = match read.await {
        Ok(Ok(body)) => body,
        Ok(Err(err)) => {
            log::error!(
                "reading an upstream error body failed: {}",
                error_chain(&err)
            );
            return ProxyError::BadGateway.into_response();
        }
        Err(_) => {
            log::error!("the upstream stalled while sending an error body");
            return ProxyError::GatewayTimeout.into_response();
        }
    };
    if let Some(masked) = mask_secret(&body, state.key_to_mask()) {
        headers.remove(header::CONTENT_LENGTH);
        body = masked.freeze();
    }
    if state.config.debug_mode {
        log::debug!(
            "response body: {}",
            state.mask(&String::from_utf8_lossy(&body))
        );
    }
    let mut reply = warp::reply::Response::new(body.into());
    *reply.status_mut() = status;
    *reply.headers_mut() = headers;
    reply
}

/// An error and its causes on one line, without the request URL (which could carry credentials).
pub fn error_chain(err: &reqwest::Error) -> String {
    let mut line = err.to_string();
    if let Some(url) = err.url() {
        line = line.replace(url.as_str(), "<upstream>");
    }
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_recognised_in_every_spelling() {
        for dots in [".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2e."] {
            assert!(is_dot_segment(dots), "{dots}");
        }
        for name in ["", "...", "a.", ".a", "%2e%2e%2e", "%2f", "%2", "v1"] {
            assert!(!is_dot_segment(name), "{name}");
        }
        assert!(has_backslash("/v1/a\\b") && has_backslash("/v1/%5Cb") && has_backslash("/%5c"));
        assert!(!has_backslash("/v1/%5b/%25c") && !has_backslash("/v1/models"));
    }
}
