//! Requests no well-behaved client sends: bad framing, absolute targets, traversal paths.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn malformed_framing_is_400_and_closes_the_connection() {
    let app = spawn_app(&[]).await;
    let auth = format!("Authorization: Bearer {CLIENT_TOKEN}\r\n");
    let cases = [
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: +5\r\n\r\nhello"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}X-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}X-Bare: a\rb\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    ];
    for request in cases {
        let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(reply.status(), 400, "{request:?} -> {}", reply.text);
        assert!(reply.closed, "{request:?} left the connection open");
    }
    assert!(app.upstream.requests().is_empty());
}

#[tokio::test]
async fn the_upstream_always_gets_clean_framing() {
    let app = spawn_app(&[]).await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         2\r\n{{}}\r\n0\r\n\r\n"
    );
    let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
    // hyper accepts a length next to `Transfer-Encoding: chunked` and reads the body as chunked
    // (RFC 9112 6.3: the transfer coding wins), so the request is served; the proxy drops the
    // stale length and the upstream sees only the chunked framing it was sent.
    assert_eq!(reply.status(), 200, "{}", reply.text);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.header("content-length"), None, "{seen:?}");
    assert_eq!(seen.header_values("transfer-encoding"), ["chunked"]);
    assert_eq!(seen.body.as_ref(), b"{}");
}

#[tokio::test]
async fn the_request_target_and_host_never_choose_the_upstream() {
    let app = spawn_app(&[]).await;
    let request = format!(
        "POST http://evil.example/v1/chat/completions?x=1 HTTP/1.1\r\nHost: evil.example\r\n\
         Authorization: Bearer {CLIENT_TOKEN}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(reply.status(), 200, "{}", reply.text);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.header("host"),
        Some(app.upstream.addr().to_string().as_str())
    );

    let connect = raw_exchange(
        app.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(connect.status(), 405, "{}", connect.text);
}

/// POSTs to each of `paths` as the client over a raw socket (reqwest would normalise them) and
/// expects `status` with `error` in the body, and nothing forwarded.
async fn assert_every_path_is_refused(paths: &[&str], status: u16, error: &str) {
    let app = spawn_app(&[]).await;
    for path in paths {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(reply.status(), status, "{path}: {}", reply.text);
        assert!(reply.text.contains(error), "{path}: {}", reply.text);
    }
    assert!(
        app.upstream.requests().is_empty(),
        "{:?}",
        app.upstream.requests()
    );
}

#[tokio::test]
async fn dot_segments_and_backslashes_are_refused_before_routing_upstream() {
    // These all match the `/v1/` pass-through; `upstream_url` refuses them (plain or
    // percent-encoded dots, encoded backslashes) because a normalising upstream would resolve
    // them outside `/v1/` with our key attached.
    let paths = [
        "/v1/../admin/cache/clear",
        "/v1/%2e%2e/admin/cache/clear",
        "/v1/%2E%2e/admin/cache/clear",
        "/v1/./../admin/cache/clear",
        "/v1/..%5cadmin/cache/clear",
    ];
    let error = "\"error\":\"invalid_path\",\"message\":\"The request path contains dot segments \
                 or backslashes\"";
    assert_every_path_is_refused(&paths, 400, error).await;
}

#[tokio::test]
async fn doubled_slashes_match_no_route_rather_than_the_admin_one() {
    // An empty segment is a segment: `//admin/..` and `/admin//..` are neither the admin route
    // nor under `/v1/`, so the route table has nothing for them.
    let paths = ["//admin/cache/clear", "/admin//cache/clear"];
    assert_every_path_is_refused(&paths, 404, "\"error\":\"not_found\"").await;
}
