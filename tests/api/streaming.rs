use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

#[tokio::test]
async fn stream_is_forwarded_chunk_by_chunk() {
    let app = spawn_app(&[]).await;
    let response = app.stream_chat(5, 150).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();

    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert_eq!(
        app.upstream.streams_completed(),
        0,
        "the first chunk reached the client while the upstream was still streaming"
    );

    let mut chunks = vec![first];
    while let Some(chunk) = body.next().await {
        chunks.push(chunk.unwrap());
    }
    // role + 5 content + finish + usage + [DONE], each event its own chunk, none merged or split.
    assert_eq!(chunks.len(), 9, "{chunks:?}");
    for chunk in &chunks {
        assert!(
            chunk.starts_with(b"data: ") && chunk.ends_with(b"\n\n"),
            "{chunk:?}"
        );
        assert_eq!(
            chunk.windows(6).filter(|w| w == b"data: ").count(),
            1,
            "{chunk:?}"
        );
    }
    assert_eq!(chunks.last().unwrap().as_ref(), b"data: [DONE]\n\n");
}

#[tokio::test]
async fn streamed_bytes_are_identical_to_the_upstream() {
    let app = spawn_app(&[]).await;
    let thirty_events = |request: reqwest::RequestBuilder| async move {
        request
            .header("x-mock-chunks", "30")
            .header("x-mock-interval-ms", "1")
            .json(&serde_json::json!({"model": "gpt-mock", "stream": true}))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    };
    let direct = thirty_events(
        app.client
            .post(format!("{}/v1/chat/completions", app.upstream.base_url())),
    )
    .await;
    let proxied = thirty_events(app.chat_request()).await;
    assert_eq!(proxied, direct);
    assert_eq!(Some(proxied), app.upstream.last_stream_bytes());
}

/// Sends a streaming chat request over a raw socket and returns the socket once the response
/// headers (and possibly the first events) have arrived.
async fn open_raw_stream(app: &TestApp, extra_headers: &str) -> tokio::net::TcpStream {
    let body = r#"{"model":"gpt-mock","stream":true}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    socket
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream() {
    let app = spawn_app(&[]).await;
    let mut socket =
        open_raw_stream(&app, "x-mock-chunks: 200\r\nx-mock-interval-ms: 50\r\n").await;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("chunk-0") {
        let read = socket.read(&mut buffer).await.unwrap();
        assert!(read > 0, "stream ended early");
        received.extend_from_slice(&buffer[..read]);
    }
    drop(socket);
    assert!(
        eventually(Duration::from_secs(3), async || {
            app.upstream.streams_cancelled() == 1
        })
        .await,
        "the upstream stream was not cancelled"
    );
    assert_eq!(app.upstream.streams_completed(), 0);
}

#[tokio::test]
async fn client_disconnect_before_response_headers_cancels_the_upstream_request() {
    let app = spawn_app(&[]).await;
    let socket = open_raw_stream(&app, "x-mock-delay-ms: 1500\r\n").await;
    assert!(
        eventually(Duration::from_secs(2), async || {
            app.upstream.requests_started() == 1
        })
        .await
    );
    drop(socket);
    // Abandoned, not answered after its delay: the proxy hung up on the upstream as well.
    assert!(
        eventually(Duration::from_secs(5), async || {
            app.upstream.requests_abandoned() == 1
        })
        .await,
        "the upstream request was not dropped: answered {}",
        app.upstream.requests_answered()
    );
    assert_eq!(app.upstream.requests_answered(), 0);
    assert_eq!(
        app.upstream.streams_started(),
        0,
        "the upstream went on to stream for a client that had left"
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_stream_finish() {
    let mut app = spawn_app(&[]).await;
    let response = app.stream_chat(8, 100).send().await.unwrap();
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();

    let server = app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = reqwest::Client::new()
        .get(app.url("/v1/models"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "new connections are refused once shutdown begins"
    );

    let mut all = first.to_vec();
    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk.expect("the stream was cut by the shutdown"));
    }
    assert!(all.ends_with(b"data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops once the stream is done")
        .unwrap();
}
