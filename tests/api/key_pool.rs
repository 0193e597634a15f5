//! `AUTH_BEARER=k1,k2`: keys in turn, failover on 429/401/403 before anything reached the
//! client, rests that are kept, refused keys taken out, and honest answers when no key is left.
//! What the upstream saw (the mock records every request with its key) is the evidence.

use futures::StreamExt;
use serde_json::json;

use crate::helpers::*;

const KEY_1: &str = "sk-pool-key-number-one";
const KEY_2: &str = "sk-pool-key-number-two";
const POOL: &str = "sk-pool-key-number-one, sk-pool-key-number-two";

async fn pool_app() -> TestApp {
    spawn_app(&[("AUTH_BEARER", POOL)]).await
}

/// The keys of every request the upstream received, in order.
fn keys_seen(app: &TestApp) -> Vec<String> {
    app.upstream
        .requests()
        .iter()
        .map(|request| request.key().unwrap_or("<none>").to_string())
        .collect()
}

fn hello() -> serde_json::Value {
    json!({"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn a_rate_limited_key_is_not_seen_by_the_client_nor_tried_while_it_rests() {
    let app = pool_app().await;
    app.upstream
        .answer_key(KEY_1, 429, &[("retry-after", "30")]);
    for _ in 0..4 {
        let response = app.chat(CLIENT_TOKEN, hello()).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("retry-after").is_none());
    }
    assert_eq!(
        keys_seen(&app),
        [KEY_1, KEY_2, KEY_2, KEY_2, KEY_2],
        "key 1 was asked once, then rested"
    );
    let first = &app.upstream.requests()[0];
    let retried = &app.upstream.requests()[1];
    assert_eq!(first.body, retried.body, "the same body on the next key");
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_rate_limited_total{key="1"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_requests_total{key="1"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_requests_total{key="2"}"#)
            .await,
        4.0
    );
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_resting{key="1"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_resting{key="2"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_rest_ends_when_the_upstream_said() {
    let app = pool_app().await;
    app.upstream
        .answer_key(KEY_1, 429, &[("retry-after-ms", "300")]);
    assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // The turn goes on from where the retry left it: key 1, rested no longer, is asked again
    // (and, still limited, hands over to key 2).
    assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2, KEY_1, KEY_2]);
}

#[tokio::test]
async fn a_refused_key_is_taken_out_of_turn() {
    let app = pool_app().await;
    app.upstream.answer_key(KEY_1, 401, &[]);
    for _ in 0..3 {
        assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    }
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2, KEY_2, KEY_2]);
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_disabled{key="1"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_key_disabled{key="2"}"#)
            .await,
        0.0
    );
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "one key is still usable");
}

#[tokio::test]
async fn when_every_key_rests_the_client_gets_the_last_answer_and_the_earliest_retry_after() {
    let app = pool_app().await;
    app.upstream
        .answer_key(KEY_1, 429, &[("retry-after", "30")]);
    // Key 2 names its wait in milliseconds: the 5 of `Retry-After` is the proxy's own count.
    app.upstream
        .answer_key(KEY_2, 429, &[("retry-after-ms", "4200"), ("x-last", "two")]);
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(
        response.headers()["x-last"],
        "two",
        "the last upstream answer"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "mock upstream answer for this key: 429"
    );

    // While both rest, nothing goes upstream; the proxy says when to come back.
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.headers()["retry-after"], "5");
    assert_json_error(
        response,
        429,
        "upstream_keys_rate_limited",
        "Every upstream key is rate-limited; retry after the time in Retry-After",
    )
    .await;
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "resting keys come back by themselves");
}

#[tokio::test]
async fn when_every_key_is_refused_the_proxy_is_not_ready() {
    let app = pool_app().await;
    app.upstream.answer_key(KEY_1, 401, &[]);
    app.upstream.answer_key(KEY_2, 403, &[]);
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.status(), 403, "the last upstream answer");
    assert!(response.headers().get("retry-after").is_none());
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_json_error(
        response,
        503,
        "upstream_keys_refused",
        "The upstream refused every key this proxy holds",
    )
    .await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "no_upstream_key");
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
}

#[tokio::test]
async fn a_stream_is_retried_before_its_first_byte() {
    let app = pool_app().await;
    app.upstream
        .answer_key(KEY_1, 429, &[("retry-after", "30")]);
    let response = app.stream_chat(3, 10).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("429"), "{text}");
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
    assert_eq!(app.upstream.streams_completed(), 1);
}

#[tokio::test]
async fn the_model_list_is_fetched_through_the_pool() {
    let app = pool_app().await;
    app.upstream.answer_key(KEY_1, 429, &[]);
    let response = app.models().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
}

#[tokio::test]
async fn a_body_up_to_1_mib_is_replayed_byte_for_byte() {
    let app = pool_app().await;
    app.upstream.answer_key(KEY_1, 429, &[]);
    let body = vec![b'a'; 1024 * 1024];
    let response = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(CLIENT_TOKEN)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        400,
        "the mock's answer to a non-JSON body"
    );
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
    assert_eq!(app.upstream.requests()[1].body, body);
}

#[tokio::test]
async fn a_2_mib_upload_is_not_retried_declared_or_chunked() {
    for chunked in [false, true] {
        let app = pool_app().await;
        app.upstream
            .answer_key(KEY_1, 429, &[("retry-after", "30")]);
        let upload = vec![b'x'; 2 * 1024 * 1024];
        let body = if chunked {
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                upload.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
            reqwest::Body::wrap_stream(futures::stream::iter(pieces))
        } else {
            reqwest::Body::from(upload.clone())
        };
        let response = app
            .client
            .post(app.url("/v1/files"))
            .bearer_auth(CLIENT_TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429, "chunked: {chunked}");
        assert_eq!(keys_seen(&app), [KEY_1], "chunked: {chunked}");
        assert_eq!(app.upstream.requests()[0].body.len(), upload.len());
    }
}

#[tokio::test]
async fn every_key_of_the_pool_is_masked_in_answers() {
    use warp::Filter;
    let echo = warp::header::<String>("authorization").map(|auth: String| {
        warp::http::Response::builder()
            .status(400)
            .header("x-echo", auth.clone())
            .body(format!("you sent {auth}"))
            .unwrap()
    });
    let addr = spawn_server(echo).await;
    let target = format!("http://{addr}");
    let app = spawn_app(&[("TARGET_HOST", target.as_str()), ("AUTH_BEARER", POOL)]).await;
    for _ in 0..2 {
        let response = app.chat(CLIENT_TOKEN, hello()).await;
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()["x-echo"], "Bearer ***");
        assert_eq!(response.text().await.unwrap(), "you sent Bearer ***");
    }
}

#[tokio::test]
async fn a_body_read_for_retries_that_stops_arriving_is_408_and_never_sent() {
    let app = spawn_app(&[("AUTH_BEARER", POOL), ("UPSTREAM_TIMEOUT_SECS", "1")]).await;
    app.assert_a_stalled_body_is_408(CLIENT_TOKEN).await;
}
