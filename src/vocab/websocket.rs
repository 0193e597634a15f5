//! "Is this a WebSocket upgrade", and the browser's token subprotocol: asked by the token check
//! (auth), the route table and the tunnel code alike, so it lives below all of them.

use warp::http::{HeaderMap, HeaderValue, Method, header};

/// Browsers cannot set headers on a WebSocket, so Realtime clients there send their token as
/// this subprotocol; it is read like the token header and never forwarded.
const TOKEN_SUBPROTOCOL: &str = "openai-insecure-api-key.";

/// Whether a request asks to become a WebSocket (`GET` with `Upgrade: websocket`).
pub fn is_websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && headers
            .get_all(header::UPGRADE)
            .iter()
            .any(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// The token a browser client put in `Sec-WebSocket-Protocol`, if any.
pub fn subprotocol_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .find_map(|protocol| protocol.strip_prefix(TOKEN_SUBPROTOCOL.as_bytes()))
}

/// `Sec-WebSocket-Protocol` without the token entry; removed entirely when nothing else is left.
pub fn drop_token_subprotocol(headers: &mut HeaderMap) {
    if !headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|protocol| !protocol.is_empty() && !protocol.starts_with(TOKEN_SUBPROTOCOL))
        .map(str::to_string)
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_subprotocol_is_read_and_never_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.tok-1, openai-beta.realtime-v1",
            ),
        );
        assert_eq!(subprotocol_token(&headers), Some(&b"tok-1"[..]));
        drop_token_subprotocol(&mut headers);
        assert_eq!(
            headers[header::SEC_WEBSOCKET_PROTOCOL],
            "realtime, openai-beta.realtime-v1"
        );

        let mut only_token = HeaderMap::new();
        only_token.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.tok-1"),
        );
        drop_token_subprotocol(&mut only_token);
        assert!(only_token.get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
    }

    #[test]
    fn only_a_get_with_upgrade_websocket_is_a_websocket_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(is_websocket_upgrade(&Method::GET, &headers));
        assert!(!is_websocket_upgrade(&Method::POST, &headers));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&Method::GET, &headers));
    }
}
