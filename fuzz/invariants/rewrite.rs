//! The invariants of request rewriting, as one function a fuzzer can drive with arbitrary bytes
//! and `cargo test` can replay over the saved corpus (`fuzz/corpus/rewrite`). Test support, not
//! library code: the fuzz target and `tests/api/fuzz_corpus.rs` include this file by `#[path]`.

use std::str::FromStr;

use warp::http::uri::PathAndQuery;
use warp::http::{HeaderMap, HeaderName, HeaderValue, header};

use llm_proxy::proxy::headers::{request_headers, response_headers};
use llm_proxy::proxy::request::upstream_url;

const TARGET_HOST: &str = "https://upstream.test/prefix";
const UPSTREAM_KEY: &str = "sk-fuzz-upstream-key";

/// Panics if rewriting the request described by `input` breaks an invariant.
///
/// Input layout, lines separated by `\n`: the request target (path and query, as hyper would
/// hand it over), then `name: value` header lines. The first byte also picks the caller token
/// header, so both `Authorization` and a custom header are exercised.
pub fn check_rewrite(input: &[u8]) {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let mut lines = rest.split(|&byte| byte == b'\n');
    let Some(target) = lines.next() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let Ok(target) = PathAndQuery::from_str(target) else {
        return;
    };

    let mut incoming = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        incoming.append(name, value);
    }

    check_url(target.path(), target.query());
    check_request_headers(selector, &incoming);
    check_response_headers(&incoming);
}

fn check_url(path: &str, query: Option<&str>) {
    let target = reqwest::Url::parse(TARGET_HOST).expect("valid target");
    // The base URL stands for the caller's `/v1`.
    let Ok(parsed) = upstream_url(&target, path, query, None) else {
        return;
    };
    let url = parsed.as_str();
    assert_eq!(parsed.host_str(), Some("upstream.test"), "{url}");
    assert!(
        parsed.path().starts_with("/prefix/") || parsed.path() == "/prefix",
        "{path:?} escaped the prefix: {url}"
    );
    let expected = query.map(url_encoded);
    assert_eq!(
        parsed.query(),
        expected.as_deref(),
        "the query string changed: {url}"
    );
}

/// The query as the URL parser sends it: hyper hands over raw non-ASCII bytes and a few
/// characters that the parser percent-encodes, which means the same to the upstream.
fn url_encoded(query: &str) -> String {
    let mut encoded = String::with_capacity(query.len());
    for byte in query.bytes() {
        if byte.is_ascii() && !matches!(byte, b' ' | b'"' | b'#' | b'<' | b'>' | b'\'') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn check_request_headers(selector: u8, incoming: &HeaderMap) {
    let token_header = if selector.is_multiple_of(2) {
        header::AUTHORIZATION
    } else {
        HeaderName::from_static("x-api-key")
    };
    // UPSTREAM_AUTH_HEADER: Authorization, or Azure's api-key.
    let key_header = if selector & 2 == 0 {
        header::AUTHORIZATION
    } else {
        HeaderName::from_static("api-key")
    };
    let mut sent = request_headers(incoming.clone(), &token_header, &key_header);
    assert!(
        !sent.contains_key(&key_header),
        "the caller's own {key_header} reached the upstream"
    );
    let upstream_key = HeaderValue::from_str(&format!("Bearer {UPSTREAM_KEY}")).expect("valid");
    sent.insert(&key_header, upstream_key.clone());
    assert_eq!(
        sent.get_all(&key_header).iter().collect::<Vec<_>>(),
        [&upstream_key],
        "exactly one {key_header}, ours"
    );
    for forbidden in [
        token_header.clone(),
        header::HOST,
        header::PROXY_AUTHORIZATION,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::EXPECT,
        HeaderName::from_static("keep-alive"),
    ] {
        if forbidden != key_header {
            assert!(
                !sent.contains_key(&forbidden),
                "{forbidden} reached the upstream"
            );
        }
    }
    for named in connection_tokens(incoming) {
        if named != key_header.as_str() {
            assert!(
                !sent.contains_key(named.as_str()),
                "{named} is named in Connection"
            );
        }
    }
    assert!(
        !(sent.contains_key(header::CONTENT_LENGTH)
            && incoming.contains_key(header::TRANSFER_ENCODING)),
        "a length next to a chunked caller body"
    );
}

fn check_response_headers(upstream: &HeaderMap) {
    let returned = response_headers(upstream.clone(), &[UPSTREAM_KEY.as_bytes()]);
    for (name, value) in &returned {
        assert!(
            memchr::memmem::find(value.as_bytes(), UPSTREAM_KEY.as_bytes()).is_none(),
            "{name} carries the upstream key"
        );
    }
    for hop in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        assert!(!returned.contains_key(hop));
    }
    for named in connection_tokens(upstream) {
        assert!(
            !returned.contains_key(named.as_str()),
            "{named} is named in Connection"
        );
    }
}

fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| HeaderName::from_bytes(token.as_bytes()).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_requests_hold_the_invariants() {
        check_rewrite(
            b"\x00/v1/chat/completions?a=1\nauthorization: Bearer t\nconnection: x-a\nx-a: 1",
        );
        check_rewrite(
            b"\x01/v1/files\nx-api-key: t\ntransfer-encoding: chunked\ncontent-length: 5",
        );
        check_rewrite(b"\x00/v1/../admin\nx-echo: sk-fuzz-upstream-key");
    }
}
