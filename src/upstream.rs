//! Talking to the upstream: header hygiene, the key swap, sending, and forwarding the answer.

use std::error::Error as _;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use warp::Buf;
use warp::Reply;
use warp::http::{HeaderMap, HeaderName, Method, header};

use crate::error::ProxyError;
use crate::state::AppState;

/// From sending the request to the upstream's response headers. Generous because a model may
/// think for minutes before its first byte; the body itself has no overall limit.
pub const UPSTREAM_HEADERS_TIMEOUT: Duration = Duration::from_secs(600);

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

fn named_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

/// Copies the end-to-end headers of `source` for which `keep` holds.
fn end_to_end(source: &HeaderMap, extra: usize, keep: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let has_connection = source.contains_key(header::CONNECTION);
    let mut copy = HeaderMap::with_capacity(source.len() + extra);
    for (name, value) in source {
        if HOP_BY_HOP.contains(name)
            || (has_connection && named_in_connection(source, name))
            || !keep(name)
        {
            continue;
        }
        copy.append(name.clone(), value.clone());
    }
    copy
}

/// The headers sent upstream: the caller's end-to-end headers without its credentials or `Host`,
/// plus the upstream key.
pub fn request_headers(state: &AppState, incoming: &HeaderMap) -> HeaderMap {
    let chunked = incoming.contains_key(header::TRANSFER_ENCODING);
    let caller_token_header = &state.config.auth_header;
    let mut headers = end_to_end(incoming, 1, |name| {
        name != header::HOST
            && name != header::AUTHORIZATION
            && name != caller_token_header
            // The proxy, not the caller, decides how the upstream body is framed; a length next
            // to `Transfer-Encoding` is exactly what request smuggling feeds on.
            && !(chunked && name == header::CONTENT_LENGTH)
            // `100-continue` is negotiated with the caller by our own server; hyper's client
            // cannot honour it towards the upstream.
            && name != header::EXPECT
    });
    headers.insert(header::AUTHORIZATION, state.upstream_authorization.clone());
    headers
}

/// The headers sent back to the caller: the upstream's, less the hop-by-hop ones.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    end_to_end(upstream, 1, |_| true)
}

/// Whether a request carries a body worth streaming upstream. Without one, no body is sent at all,
/// so a `GET` does not go out as an empty chunked message.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// Streams the caller's body upstream as it arrives.
pub fn request_body<S, B>(state: &AppState, body: S) -> reqwest::Body
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let body = body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining()));
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
    path: &str,
    query: Option<&str>,
    headers: HeaderMap,
    body: Option<reqwest::Body>,
) -> Result<reqwest::Response, ProxyError> {
    let mut url = String::with_capacity(
        state.config.target_host.len() + path.len() + query.map_or(0, |q| q.len() + 1),
    );
    url.push_str(&state.config.target_host);
    url.push_str(path);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "upstream request: {method} {path} headers: {}",
            state.describe_headers(&headers)
        );
    }
    let mut request = state.client.request(method, url).headers(headers);
    if let Some(body) = body {
        request = request.body(body);
    }
    match tokio::time::timeout(UPSTREAM_HEADERS_TIMEOUT, request.send()).await {
        Err(_) => {
            log::error!(
                "upstream sent no response headers within {}s",
                UPSTREAM_HEADERS_TIMEOUT.as_secs()
            );
            Err(ProxyError::GatewayTimeout)
        }
        Ok(Err(err)) => {
            log::error!("upstream request failed: {}", error_chain(&err));
            Err(if err.is_timeout() {
                ProxyError::GatewayTimeout
            } else {
                ProxyError::BadGateway
            })
        }
        Ok(Ok(response)) => Ok(response),
    }
}

/// The upstream's answer as the caller's response: same status, end-to-end headers, and the
/// body forwarded chunk by chunk as it arrives, bytes untouched.
pub fn into_reply(state: &AppState, upstream: reqwest::Response) -> warp::reply::Response {
    let status = upstream.status();
    let headers = response_headers(upstream.headers());
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "upstream response: {status} headers: {}",
            state.describe_headers(&headers)
        );
    }
    let body = upstream.bytes_stream();
    let mut reply = if state.config.debug_mode {
        let state = state.clone();
        warp::reply::stream(body.inspect(move |chunk| match chunk {
            Ok(chunk) => log::debug!(
                "response body chunk: {}",
                state.mask(&String::from_utf8_lossy(chunk))
            ),
            Err(err) => log::debug!("response body failed: {}", error_chain(err)),
        }))
        .into_response()
    } else {
        warp::reply::stream(body).into_response()
    };
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
