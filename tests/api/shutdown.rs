//! Draining on shutdown: idle connections, a second request to stop, the grace period.

use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::helpers::*;

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
