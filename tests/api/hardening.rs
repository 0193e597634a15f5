//! Faults, limits and hostile input, each through real sockets.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::helpers::*;

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

/// Reads a streamed response to its end and returns the bytes received and whether it ended
/// in an error (a truncated transfer) rather than cleanly.
async fn read_stream(response: reqwest::Response) -> (String, bool) {
    read_rest(response.bytes_stream()).await
}

/// [`read_stream`] for a body already partly read.
async fn read_rest(
    mut body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> (String, bool) {
    let mut received = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => received.extend_from_slice(&chunk),
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), false)
}

#[tokio::test]
async fn no_response_headers_in_time_is_a_504() {
    let app = spawn_app(&[("UPSTREAM_TIMEOUT_SECS", "1")]).await;
    let started = Instant::now();
    let response = app
        .stream_chat(5, 10)
        .header("x-mock-delay-ms", "4000")
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_json_error(
        response,
        504,
        "gateway_timeout",
        "The upstream server did not answer in time",
    )
    .await;
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event_and_a_truncated_transfer() {
    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let mut reply = SSE_HEAD.to_vec();
        reply.extend(chunk("data: {\"choices\":[]}\n\n"));
        socket.write_all(&reply).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target), ("STREAM_IDLE_TIMEOUT_SECS", "1")]).await;
    let started = Instant::now();
    let (received, truncated) = read_stream(app.stream_chat(5, 10).send().await.unwrap()).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        received.starts_with("data: {\"choices\":[]}\n\n"),
        "{received}"
    );
    assert!(
        received.ends_with(
            "data: {\"error\":{\"code\":\"upstream_stream_stalled\",\"message\":\"The upstream \
             stopped sending data; the response is incomplete\",\"type\":\"proxy_error\"}}\n\n"
        ),
        "{received}"
    );
    assert!(truncated, "the response must not end cleanly");
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_is_not_reported_as_complete() {
    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let mut reply = SSE_HEAD.to_vec();
        reply.extend(chunk("data: {\"choices\":[]}\n\ndata: {\"partial"));
        socket.write_all(&reply).await.unwrap();
        // Closing inside the chunked body: the upstream's message is incomplete.
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target)]).await;
    let (received, truncated) = read_stream(app.stream_chat(5, 10).send().await.unwrap()).await;
    assert!(truncated);
    assert!(
        received.contains("data: {\"partial\n\ndata: {\"error\""),
        "{received}"
    );
    assert!(
        received.contains("upstream_stream_interrupted"),
        "{received}"
    );
}

#[tokio::test]
async fn a_long_stream_with_short_gaps_is_never_cut() {
    let app = spawn_app(&[("STREAM_IDLE_TIMEOUT_SECS", "1")]).await;
    let response = app.stream_chat(12, 300).send().await.unwrap();
    let (received, truncated) = read_stream(response).await;
    assert!(!truncated);
    assert!(received.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn an_upstream_that_echoes_the_key_has_it_masked() {
    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let body =
            format!("{{\"error\":{{\"message\":\"Incorrect API key provided: {UPSTREAM_KEY}\"}}}}");
        let reply = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
             x-seen-authorization: Bearer {UPSTREAM_KEY}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(reply.as_bytes()).await.unwrap();
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target)]).await;
    for path in ["/v1/chat/completions", "/v1/models"] {
        let response = app
            .client
            .request(
                if path.ends_with("models") {
                    reqwest::Method::GET
                } else {
                    reqwest::Method::POST
                },
                app.url(path),
            )
            .bearer_auth(CLIENT_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["x-seen-authorization"], "Bearer ***");
        let body = response.text().await.unwrap();
        assert_eq!(
            body,
            "{\"error\":{\"message\":\"Incorrect API key provided: ***\"}}"
        );
    }
}

#[tokio::test]
async fn a_slow_header_sender_is_disconnected_and_others_are_served() {
    let app = spawn_app(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let slow = tokio::spawn({
        let addr = app.addr;
        async move {
            let started = Instant::now();
            let reply = raw_exchange(
                addr,
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow:",
                Duration::from_secs(5),
            )
            .await;
            (reply, started.elapsed())
        }
    });
    let served = app.models().await;
    assert_eq!(served.unwrap().status(), 200);
    let (reply, elapsed) = slow.await.unwrap();
    assert!(reply.closed, "the slow client was not disconnected");
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_the_upstream_hears_of_it() {
    let app = spawn_app(&[("MAX_BODY_BYTES", "1000")]).await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Length: 5000000\r\n\r\n{{\"model\""
    );
    let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(reply.status(), 413, "{}", reply.text);
    assert!(
        reply.text.contains("\"error\":\"payload_too_large\""),
        "{}",
        reply.text
    );
    assert!(app.upstream.requests().is_empty());
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_and_never_completes_upstream() {
    let app = spawn_app(&[("MAX_BODY_BYTES", "1000")]).await;
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'x'; 500])).collect();
    let response = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(CLIENT_TOKEN)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_json_error(
        response,
        413,
        "payload_too_large",
        "The request body is larger than this proxy accepts",
    )
    .await;
    // The body is streamed, so the upstream has begun the request; what must not happen is
    // that it gets all of it. Once it has given up on the request, it can no longer.
    assert!(
        eventually(Duration::from_secs(5), || app.upstream.requests_abandoned()
            == 1)
        .await,
        "the upstream was not left with a cut-off request: started {}, answered {}",
        app.upstream.requests_started(),
        app.upstream.requests_answered()
    );
    assert_eq!(app.upstream.requests_started(), 1);
    assert_eq!(
        app.upstream.requests_answered(),
        0,
        "the upstream received a complete body"
    );

    let fits = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(CLIENT_TOKEN)
        .body(vec![b'y'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200, "a body at the limit is fine");
}

#[tokio::test]
async fn beyond_max_concurrent_requests_callers_get_503_at_once() {
    let app = spawn_app(&[("MAX_CONCURRENT_REQUESTS", "2")]).await;
    let slow = |_: u8| app.stream_chat(3, 400).send();
    let first = slow(1).await.unwrap();
    let second = slow(2).await.unwrap();
    let started = Instant::now();
    let third = app.models().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(third.headers()["retry-after"], "1");
    assert_json_error(
        third,
        503,
        "overloaded",
        "Too many requests in flight; retry shortly",
    )
    .await;
    assert_eq!(
        app.upstream.requests_started(),
        2,
        "the refused request never reached the upstream"
    );

    for probe in ["/healthz", "/readyz"] {
        let answered = app.client.get(app.url(probe)).send().await.unwrap();
        assert_eq!(
            answered.status(),
            200,
            "{probe} answers even when the proxy is full"
        );
    }

    let (one, _) = read_stream(first).await;
    let (two, _) = read_stream(second).await;
    assert!(one.ends_with("[DONE]\n\n") && two.ends_with("[DONE]\n\n"));
    // The place is given back with the response body, right after the gauge drops: once the
    // gauge reads zero, the next request cannot find the proxy full.
    let in_flight = || app.state.metrics.requests_in_flight().get();
    assert!(
        eventually(Duration::from_secs(5), || in_flight() == 0).await,
        "still {} in flight",
        in_flight()
    );
    let after = app.models().await;
    assert_eq!(
        after.unwrap().status(),
        200,
        "places are given back when streams end"
    );
}

/// Sends `request`, expects hyper's bare 431 and a closed connection, and then checks that the
/// server still serves and that only the later, well-formed request went upstream.
async fn assert_refused_as_too_large(app: &TestApp, request: &str) {
    let reply = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(
        reply.status(),
        431,
        "{}",
        &reply.text[..reply.text.len().min(200)]
    );
    assert!(reply.closed, "the connection was left open");

    let served = app.models().await;
    assert_eq!(served.unwrap().status(), 200);
    let seen: Vec<_> = app
        .upstream
        .requests()
        .into_iter()
        .map(|request| (request.method, request.path))
        .collect();
    assert_eq!(
        seen,
        [("GET".to_string(), "/v1/models".to_string())],
        "nothing malformed went upstream"
    );
}

#[tokio::test]
async fn a_header_section_over_64_kib_is_431_and_the_server_keeps_serving() {
    // One 100 kB header cannot fit in the 64 KiB read buffer the server gives hyper
    // (`max_buf_size`), so hyper gives up on the head before it is complete.
    let app = spawn_app(&[]).await;
    let huge = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    assert_refused_as_too_large(&app, &huge).await;
}

#[tokio::test]
async fn more_than_a_hundred_headers_is_431_and_the_server_keeps_serving() {
    // Only 3 kB, well inside the buffer: what refuses it is hyper's fixed table of 100 parsed
    // headers (`Host` and 99 more still pass).
    let app = spawn_app(&[]).await;
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_refused_as_too_large(&app, &many).await;
}

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

/// POSTs to `path` as the client and returns the raw reply.
async fn post_raw(app: &TestApp, path: &str) -> RawReply {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await
}

#[tokio::test]
async fn dot_segments_and_backslashes_are_refused_before_routing_upstream() {
    // These all match the `/v1/` pass-through; `upstream_url` refuses them (plain or
    // percent-encoded dots, encoded backslashes) because a normalising upstream would resolve
    // them outside `/v1/` with our key attached.
    let app = spawn_app(&[]).await;
    for path in [
        "/v1/../admin/cache/clear",
        "/v1/%2e%2e/admin/cache/clear",
        "/v1/%2E%2e/admin/cache/clear",
        "/v1/./../admin/cache/clear",
        "/v1/..%5cadmin/cache/clear",
    ] {
        let reply = post_raw(&app, path).await;
        assert_eq!(reply.status(), 400, "{path}: {}", reply.text);
        assert!(
            reply.text.contains(
                "\"error\":\"invalid_path\",\"message\":\"The request path contains dot \
                 segments or backslashes\""
            ),
            "{path}: {}",
            reply.text
        );
    }
    assert!(
        app.upstream.requests().is_empty(),
        "{:?}",
        app.upstream.requests()
    );
}

#[tokio::test]
async fn doubled_slashes_match_no_route_rather_than_the_admin_one() {
    // An empty segment is a segment: `//admin/..` and `/admin//..` are neither the admin route
    // nor under `/v1/`, so the route table has nothing for them.
    let app = spawn_app(&[]).await;
    for path in ["//admin/cache/clear", "/admin//cache/clear"] {
        let reply = post_raw(&app, path).await;
        assert_eq!(reply.status(), 404, "{path}: {}", reply.text);
        assert!(
            reply.text.contains("\"error\":\"not_found\""),
            "{path}: {}",
            reply.text
        );
    }
    assert!(
        app.upstream.requests().is_empty(),
        "{:?}",
        app.upstream.requests()
    );
}

#[tokio::test]
async fn a_request_the_upstream_may_have_received_is_never_repeated() {
    let (target, heads) = spawn_raw_upstream(|socket| async move {
        // Read the request, then hang up without answering.
        drop(socket);
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target)]).await;
    let response = app
        .chat(CLIENT_TOKEN, serde_json::json!({"model": "m"}))
        .await;
    assert_eq!(response.status(), 502);
    // A retry would go out before the 502. A marker sent after it, and answered (so recorded),
    // must therefore be the second and last request the upstream saw.
    let marker = app
        .chat_request()
        .header("x-marker", "after")
        .json(&serde_json::json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), 502);
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert!(!heads[0].contains("x-marker"), "{heads:#?}");
    assert!(heads[1].contains("x-marker: after"), "{heads:#?}");
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let mut app = spawn_app(&[]).await;
    let keep_alive = reqwest::Client::new();
    let response = keep_alive
        .get(app.url("/v1/models"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 200);
    let started = Instant::now();
    let server = app.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("an idle keep-alive connection held up the shutdown")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_second_shutdown_request_closes_what_remains() {
    let mut app = spawn_app(&[]).await;
    let response = app.stream_chat(100, 100).send().await.unwrap();
    let server = app.begin_shutdown();
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    // Events still arriving after the first request is the drain at work.
    while !String::from_utf8_lossy(&received).contains("chunk-2 ") {
        let chunk = body.next().await.expect("the stream ended").unwrap();
        received.extend_from_slice(&chunk);
    }
    assert!(!server.is_finished(), "the stream is still being drained");
    app.shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("forced stop")
        .unwrap();
    let (rest, truncated) = read_rest(body).await;
    assert!(truncated, "the remaining stream was cut");
    assert!(!rest.contains("[DONE]"), "{rest}");
}

#[tokio::test]
async fn the_grace_period_bounds_the_drain() {
    let mut app = spawn_app(&[("SHUTDOWN_GRACE_SECS", "1")]).await;
    let response = app.stream_chat(100, 100).send().await.unwrap();
    let started = Instant::now();
    let server = app.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("drain bounded")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    let (received, truncated) = read_stream(response).await;
    assert!(truncated && !received.contains("[DONE]"));
}

#[tokio::test]
async fn a_key_too_short_to_be_real_is_not_searched_for_in_answers() {
    let upstream = mock_upstream::MockUpstream::start().await;
    let target = upstream.base_url();
    let app = spawn_app_with_upstream(
        upstream,
        &[("TARGET_HOST", &target), ("AUTH_BEARER", "mock")],
    )
    .await;
    let response = app.chat("t", serde_json::json!({})).await;
    assert_eq!(response.headers()["x-request-id"], "req_mock_chat");
}
