//! An upstream that is slow, stalls, resets, echoes our key or hangs up: what the caller sees.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::helpers::*;

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
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
    for (method, path) in [
        (reqwest::Method::POST, "/v1/chat/completions"),
        (reqwest::Method::GET, "/v1/models"),
    ] {
        let response = app.authorised(method, path).send().await.unwrap();
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

#[tokio::test]
async fn a_request_the_upstream_may_have_received_is_never_repeated() {
    for pool in ["one-upstream-key", "first-upstream-key,second-upstream-key"] {
        a_request_that_may_have_arrived_goes_out_once(pool).await;
    }
}

/// With one key and with a pool (which retries other failures on the next key) alike.
async fn a_request_that_may_have_arrived_goes_out_once(keys: &str) {
    let (target, heads) = spawn_raw_upstream(|socket| async move {
        // Read the request, then hang up without answering.
        drop(socket);
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target), ("AUTH_BEARER", keys)]).await;
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
async fn without_an_upstreams_file_failing_answers_open_no_breaker_and_keep_the_proxy_ready() {
    // One upstream from the environment, as before there were several: its 503s are the
    // caller's answers, and a run of them must not take the replica out of its load balancer.
    let app = spawn_app(&[]).await;
    app.upstream.answer_key(UPSTREAM_KEY, 503, &[]);
    for _ in 0..6 {
        assert_eq!(app.chat(CLIENT_TOKEN, chat_body()).await.status(), 503);
    }
    assert_eq!(app.upstream.requests().len(), 6, "every request was sent");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"limits": "local", "status": "ready"}),
        "the body as it always was"
    );
    let metrics = app.metrics_text().await;
    assert!(
        !metrics.contains("llm_proxy_panic_routing_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_proxy_upstream_breaker_state{upstream=\"default\"} 0"),
        "{metrics}"
    );
}

fn chat_body() -> serde_json::Value {
    serde_json::json!({"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
}
