//! Header hygiene in one table: what is dropped in both directions, what the upstream gets in
//! place of the caller's credentials, and what the caller gets back.

use warp::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::auth::redact::mask_header_values;

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

/// The headers sent upstream: the caller's end-to-end headers without its credentials (its token
/// header, `Authorization`, its own copy of the header the upstream key goes in, a token in
/// `Sec-WebSocket-Protocol`) or `Host`. The key itself is
/// added per attempt, since a retry may use another key of the pool.
pub fn request_headers(
    mut headers: HeaderMap,
    caller_token_header: &HeaderName,
    upstream_key_header: &HeaderName,
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
    headers.remove(upstream_key_header);
    // Whatever header the key goes in, the caller's own `Authorization` is a credential of ours
    // (the OpenAI SDKs always send one), never the upstream's business.
    headers.remove(header::AUTHORIZATION);
    // A browser's token in the WebSocket subprotocol list, on whatever request it came.
    crate::vocab::websocket::drop_token_subprotocol(&mut headers);
    headers
}

/// The headers as a list, kept for a request that may be sent again after its map went to an
/// attempt: one allocation, where a copy of the map takes two (and copies its hash index).
pub fn listed(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut listed = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        listed.push((name.clone(), value.clone()));
    }
    listed
}

/// The map [`listed`] was made from: the same names and values in the same order (a map keeps
/// its names in the order they first came, and each one's values in theirs), so that what is
/// then removed from it, and what is sent, is what the map itself would have given.
pub fn from_listed(listed: impl ExactSizeIterator<Item = (HeaderName, HeaderValue)>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(listed.len());
    for (name, value) in listed {
        headers.append(name, value);
    }
    headers
}

/// The headers sent back to the caller: the upstream's, less the hop-by-hop ones, with the
/// upstream keys masked wherever an upstream echoed one.
pub fn response_headers<K: AsRef<[u8]>>(mut headers: HeaderMap, upstream_keys: &[K]) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for key in upstream_keys {
        mask_header_values(&mut headers, key.as_ref());
    }
    headers
}

/// The declared `Content-Length`, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The one rule for "this answer is a server-sent-event stream": its content type. The access
/// line, the metrics and the stream watchdog all ask this.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
}

/// Whether an answer is JSON (`application/json`, with or without parameters).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| {
        value
            .as_bytes()
            .get(..16)
            .is_some_and(|essence| essence.eq_ignore_ascii_case(b"application/json"))
    })
}
