//! Header read time, body size, header section size and concurrency limits, over real sockets.

use std::time::{Duration, Instant};

use crate::helpers::*;

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
    // Not even the head: the refusal comes from the declared length alone.
    assert_eq!(app.upstream.requests_started(), 0);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_and_never_completes_upstream() {
    let app = spawn_app(&[("MAX_BODY_BYTES", "1000")]).await;
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'x'; 500])).collect();
    let response = app
        .authorised(reqwest::Method::POST, "/v1/files")
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
        eventually(Duration::from_secs(5), async || {
            app.upstream.requests_abandoned() == 1
        })
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
        .authorised(reqwest::Method::POST, "/v1/files")
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
        eventually(Duration::from_secs(5), async || in_flight() == 0).await,
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
