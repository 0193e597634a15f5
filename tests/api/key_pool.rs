//! `AUTH_BEARER=k1,k2`: keys in turn, failover on 429 before anything reached the client, rests
//! that are kept, bad keys taken out after a probe with the key alone and back when a probe is
//! accepted, refusals that belong to the request passed on without touching any key, and honest
//! answers when no key is left. What the upstream saw (the mock records every request with its
//! key) is the evidence.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::helpers::*;
use crate::process::{RunningProxy, drain, start_binary_with_mock};

const KEY_1: &str = "sk-pool-key-number-one";
const KEY_2: &str = "sk-pool-key-number-two";
const KEY_3: &str = "sk-pool-key-number-three";
const POOL: &str = "sk-pool-key-number-one, sk-pool-key-number-two";
const POOL_OF_3: &str = "sk-pool-key-number-one, sk-pool-key-number-two, sk-pool-key-number-three";
/// What a key probe asks the mock for.
const PROBE_PATH: &str = "/v1/models";

async fn pool_app() -> TestApp {
    spawn_app(&[("AUTH_BEARER", POOL)]).await
}

/// The keys of every request the upstream received, in order.
fn keys_seen(app: &TestApp) -> Vec<String> {
    keys_seen_on(app, None)
}

/// The keys of the requests for `path` (every path for `None`) the upstream received, in order.
fn keys_seen_on(app: &TestApp, path: Option<&str>) -> Vec<String> {
    app.upstream
        .requests()
        .iter()
        .filter(|request| path.is_none_or(|path| request.path == path))
        .map(|request| request.key().unwrap_or("<none>").to_string())
        .collect()
}

/// The keys the probes (`GET /v1/models` with a key alone) carried, in order.
fn keys_probed(app: &TestApp) -> Vec<String> {
    app.upstream
        .requests()
        .iter()
        .filter(|request| request.method == "GET" && request.path == PROBE_PATH)
        .map(|request| request.key().unwrap_or("<none>").to_string())
        .collect()
}

/// Probes and retries run side by side, so only the set of keys they used is certain.
fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

/// Polls `/metrics` until `series` reads `value`; false if it does not within 5 s.
async fn metric_becomes(app: &TestApp, series: &str, value: f64) -> bool {
    metric_at_becomes(&app.url("/metrics"), series, value).await
}

async fn metric_at_becomes(metrics_url: &str, series: &str, value: f64) -> bool {
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(5), async || {
        let text = client
            .get(metrics_url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let read = text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok());
        read == Some(value)
    })
    .await
}

fn disabled(position: u32) -> String {
    format!(r#"llm_proxy_upstream_key_disabled{{key="{position}"}}"#)
}

fn probes(position: u32, outcome: &str) -> String {
    format!(r#"llm_proxy_upstream_key_probes_total{{key="{position}",outcome="{outcome}"}}"#)
}

async fn readyz(app: &TestApp) -> u16 {
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    ready.status().as_u16()
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
async fn a_body_read_whole_for_a_clients_limits_reaches_the_next_key_whole() {
    // A client with a token limit has its body read whole (for its estimate) before the key
    // pool keeps it for the retry: the retry must send those bytes, not the caller's
    // Content-Length with nothing behind it.
    let clients = crate::clients::scratch_dir("pool-clients").join("clients.toml");
    std::fs::write(
        &clients,
        "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 100000\n",
    )
    .unwrap();
    let app = spawn_app(&[
        ("AUTH_BEARER", POOL),
        ("CLIENTS_FILE", clients.to_str().unwrap()),
    ])
    .await;
    app.upstream
        .answer_key(KEY_1, 429, &[("retry-after", "30")]);
    let sent =
        r#"{"model":"gpt-mock","messages":[{"role":"user","content":"read once, sent twice"}]}"#;
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .header("content-type", "application/json")
        .body(sent)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("an answer within 3 s, not a request left waiting for its body");
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(keys_seen(&app), [KEY_1, KEY_2]);
    for request in app.upstream.requests() {
        assert_eq!(request.body, sent.as_bytes(), "{:?}", request.key());
    }
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
async fn a_bad_key_is_taken_out_of_turn_once_its_probe_is_refused_too() {
    let app = pool_app().await;
    app.upstream.answer_key(KEY_1, 401, &[]);
    assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    assert!(metric_becomes(&app, &disabled(1), 1.0).await);
    assert_eq!(
        keys_probed(&app),
        [KEY_1],
        "one probe, with the suspect key alone"
    );
    let requests = app.upstream.requests();
    let probe = requests
        .iter()
        .find(|request| request.path == PROBE_PATH)
        .unwrap();
    assert_eq!(probe.body.len(), 0);
    assert!(probe.header("x-mock-status").is_none());
    for _ in 0..3 {
        assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    }
    assert_eq!(
        keys_seen_on(&app, Some("/v1/chat/completions")),
        [KEY_1, KEY_2, KEY_2, KEY_2, KEY_2]
    );
    assert_eq!(app.metric(&probes(1, "refused")).await, 1.0);
    assert_eq!(app.metric(&disabled(2)).await, 0.0);
    assert_eq!(readyz(&app).await, 200, "one key is still usable");
}

#[tokio::test]
async fn a_403_for_one_request_leaves_every_key_usable() {
    let app = spawn_app(&[("AUTH_BEARER", POOL_OF_3)]).await;
    for _ in 0..3 {
        let response = app
            .authorised(reqwest::Method::GET, "/v1/files")
            .header("x-mock-status", "403")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["message"], "mock upstream error 403");
    }
    assert_eq!(
        keys_seen(&app),
        [KEY_1, KEY_2, KEY_3],
        "each 403 passed on at once: no retry, no probe"
    );
    for position in 1..=3 {
        assert_eq!(app.metric(&disabled(position)).await, 0.0);
    }
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_refusals_passed_total{status="403"}"#)
            .await,
        3.0
    );
    assert_eq!(readyz(&app).await, 200);
    for _ in 0..3 {
        assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    }
    assert_eq!(
        keys_seen_on(&app, Some("/v1/chat/completions")),
        [KEY_1, KEY_2, KEY_3]
    );
}

#[tokio::test]
async fn a_401_that_belongs_to_the_request_changes_no_key() {
    let app = spawn_app(&[("AUTH_BEARER", POOL_OF_3)]).await;
    let response = app
        .authorised(reqwest::Method::GET, "/v1/files")
        .header("x-mock-status", "401")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the upstream's answer");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock upstream error 401");
    assert_eq!(
        keys_seen_on(&app, Some("/v1/files")),
        [KEY_1, KEY_2],
        "one other key tried, not every key"
    );
    assert!(metric_becomes(&app, &probes(1, "accepted"), 1.0).await);
    assert!(metric_becomes(&app, &probes(2, "accepted"), 1.0).await);
    assert_eq!(
        sorted(keys_probed(&app)),
        sorted(vec![KEY_1.into(), KEY_2.into()]),
        "one probe of each key that answered 401"
    );
    for position in 1..=3 {
        assert_eq!(app.metric(&disabled(position)).await, 0.0);
    }
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_refusals_passed_total{status="401"}"#)
            .await,
        1.0
    );
    assert_eq!(readyz(&app).await, 200);
    for _ in 0..3 {
        assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    }
    assert_eq!(
        sorted(keys_seen_on(&app, Some("/v1/chat/completions"))),
        sorted(vec![KEY_1.into(), KEY_2.into(), KEY_3.into()]),
        "every key still in turn"
    );
}

#[tokio::test]
async fn a_request_larger_than_the_limit_itself_rests_no_key() {
    let app = pool_app().await;
    let message = "Request too large for gpt-mock in organization org-mock on tokens per min \
                   (TPM): Limit 30000, Requested 45000. The input or output tokens must be \
                   reduced in order to run successfully.";
    let response = app
        .chat_request()
        .header("x-mock-status", "429")
        .header("x-mock-message", message)
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["retry-after"],
        "1",
        "the upstream's headers, as they came"
    );
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), length);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["message"], message);
    assert_eq!(keys_seen(&app), [KEY_1], "not retried on another key");
    for key in ["1", "2"] {
        assert_eq!(
            app.metric(&format!(r#"llm_proxy_upstream_key_resting{{key="{key}"}}"#))
                .await,
            0.0
        );
    }
    assert_eq!(
        app.metric(r#"llm_proxy_upstream_refusals_passed_total{status="429"}"#)
            .await,
        1.0
    );
    for _ in 0..2 {
        assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    }
    assert_eq!(
        keys_seen(&app),
        [KEY_1, KEY_2, KEY_1],
        "both keys still in turn"
    );
}

/// The binary, so that the re-probe interval can be shortened by its test-only variable.
#[tokio::test]
async fn a_disabled_key_is_probed_again_and_comes_back_when_accepted() {
    let (upstream, mut proxy) = start_binary_with_mock(&[
        ("AUTH_BEARER", POOL),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("LLM_PROXY_TEST_KEY_REPROBE_MS", "200"),
    ])
    .await;
    let metrics = proxy.url("/metrics");
    upstream.answer_key(KEY_1, 401, &[]);
    let chat = |proxy: &RunningProxy| {
        reqwest::Client::new()
            .post(proxy.url("/v1/chat/completions"))
            .json(&hello())
            .send()
    };
    assert_eq!(chat(&proxy).await.unwrap().status(), 200);
    assert!(metric_at_becomes(&metrics, &disabled(1), 1.0).await);
    // Still refused: the re-probes keep it out.
    assert!(metric_at_becomes(&metrics, &probes(1, "refused"), 3.0).await);
    assert!(metric_at_becomes(&metrics, &disabled(1), 1.0).await);

    upstream.forget_key(KEY_1);
    assert!(metric_at_becomes(&metrics, &disabled(1), 0.0).await);
    assert!(metric_at_becomes(&metrics, &probes(1, "accepted"), 1.0).await);
    let before = upstream.requests().len();
    for _ in 0..2 {
        assert_eq!(chat(&proxy).await.unwrap().status(), 200);
    }
    let keys: Vec<String> = upstream.requests()[before..]
        .iter()
        .filter(|request| request.path == "/v1/chat/completions")
        .map(|request| request.key().unwrap().to_string())
        .collect();
    assert_eq!(
        sorted(keys),
        sorted(vec![KEY_1.into(), KEY_2.into()]),
        "key 1 is in turn again"
    );

    let log = drain(&mut proxy.log);
    assert!(
        log.contains(
            "upstream key 1 of 2 (AUTH_BEARER) was refused with 401, and so was its probe"
        ),
        "{log}"
    );
    assert!(
        log.contains("upstream key 1 of 2 (AUTH_BEARER) was accepted by its probe: back in turn"),
        "{log}"
    );
    assert!(!log.contains(KEY_1), "no key in the log");
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
    app.upstream.answer_key(KEY_2, 401, &[("x-last", "two")]);
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.status(), 401, "the last upstream answer");
    assert_eq!(response.headers()["x-last"], "two");
    assert!(metric_becomes(&app, &disabled(1), 1.0).await);
    assert!(metric_becomes(&app, &disabled(2), 1.0).await);
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
    assert_eq!(
        keys_seen_on(&app, Some("/v1/chat/completions")),
        [KEY_1, KEY_2]
    );
}

#[tokio::test]
async fn a_single_key_answered_401_403_or_429_is_never_probed_nor_benched() {
    let app = spawn_app(&[]).await;
    for status in ["401", "403", "429", "401"] {
        let response = app
            .chat_request()
            .header("x-mock-status", status)
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_str(), status);
    }
    assert_eq!(app.chat(CLIENT_TOKEN, hello()).await.status(), 200);
    assert_eq!(app.upstream.requests().len(), 5, "no probe, no retry");
    assert_eq!(app.metric(&disabled(1)).await, 0.0);
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
    let app = spawn_app_before_server(echo, &[("AUTH_BEARER", POOL)]).await;
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
