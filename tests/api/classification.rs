//! One classification per request, from its canonical path: odd spellings of an endpoint are that
//! endpoint to the limits, the usage scan, the metrics and the upstream alike; paths without a
//! safe canonical form are refused when they carry a body, and kept as they came when not.

use std::time::Duration;

use serde_json::json;

use crate::client_limits::admin_usage;
use crate::clients::{chat_body, spawn_with_clients};
use crate::helpers::*;
use crate::process::start_binary_with_mock;

/// The three spellings of chat a client could use to pass the usage scan by.
const ODD_CHAT_PATHS: [&str; 3] = [
    "/v1/chat/%63ompletions",
    "/v1//chat/completions",
    "/v1/chat/completions/",
];

/// Polls the `/metrics` series until it reads `expected` (the access record of a response is
/// written just after its last byte went out), and asserts it does.
async fn assert_metric_reaches(app: &TestApp, series: &str, expected: f64) {
    eventually(Duration::from_secs(5), async || {
        app.metric(series).await == expected
    })
    .await;
    assert_eq!(app.metric(series).await, expected, "{series}");
}

#[tokio::test]
async fn odd_spellings_of_chat_are_settled_from_the_upstream_s_usage_and_sent_canonical() {
    let (app, _) = spawn_with_clients(
        "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 1000000\n\
         tokens_per_day = 1000000\n",
    )
    .await;
    // An output cap far above what the mock spends: settled from the estimate, each request
    // would count thousands of tokens; from the upstream's usage it counts 13 (7 + 6).
    let mut body = chat_body("gpt-mock");
    body["max_tokens"] = json!(5000);
    for path in ODD_CHAT_PATHS {
        let answer = app
            .client
            .post(app.url(path))
            .bearer_auth("tok-alice")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        let answer: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(answer["object"], "chat.completion", "{path}");
    }
    let usage = admin_usage(&app, "alice").await;
    assert_eq!(usage["tokens_today"], 39, "{usage}");
    assert_eq!(usage["tokens_last_minute"], 39, "{usage}");
    let paths: Vec<String> = app
        .upstream
        .requests()
        .into_iter()
        .map(|request| request.path)
        .collect();
    assert_eq!(paths, ["/v1/chat/completions"; 3]);
    assert_metric_reaches(
        &app,
        r#"llm_proxy_requests_total{route="chat",method="POST",status_class="2xx"}"#,
        3.0,
    )
    .await;
}

#[tokio::test]
async fn a_token_limit_holds_against_odd_spellings_of_chat() {
    // Each chat is estimated at 16 tokens (its 64-byte body) and settles at 13 (the mock's
    // usage): three fit in 45 (26 used + 16 for the third), the fourth does not (39 + 16). Settled
    // from the estimate, the third would already have been refused (32 + 16).
    let (app, _) =
        spawn_with_clients("[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 45\n")
            .await;
    for path in ODD_CHAT_PATHS {
        let answer = app
            .client
            .post(app.url(path))
            .bearer_auth("tok-alice")
            .json(&chat_body("gpt-mock"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        answer.bytes().await.unwrap();
    }
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(app.upstream.requests().len(), 3);
}

/// Sends `POST path` with a JSON body as `CLIENT_TOKEN`, byte for byte as written (an HTTP
/// client would normalise some of these paths before sending).
async fn raw_post(app: &TestApp, path: &str) -> RawReply {
    let body = r#"{"model":"gpt-mock","messages":[]}"#;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(5)).await
}

#[tokio::test]
async fn a_body_on_a_path_without_a_safe_canonical_form_is_refused_and_never_sent() {
    let app = spawn_app(&[]).await;
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat/%2e%2e/chat/completions",
        "/v1/chat/completions%zz",
    ] {
        let reply = raw_post(&app, path).await;
        assert_eq!(reply.status(), 400, "{path}: {}", reply.text);
        let body = reply.text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"], "invalid_path", "{path}");
        assert_eq!(
            error["message"],
            "The request path contains an encoded slash, a dot segment or an invalid escape"
        );
        assert_rfc3339(error["time"].as_str().unwrap());
    }
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
}

#[tokio::test]
async fn a_model_id_with_an_encoded_slash_is_forwarded_as_it_came() {
    let app = spawn_app(&[]).await;
    let path = "/v1/models/meta-llama%2FLlama-3.1-8B";
    let answer = app
        .authorised(reqwest::Method::GET, path)
        .send()
        .await
        .unwrap();
    // The mock knows no such model: its own 404 comes back, not a refusal of the proxy.
    assert_eq!(answer.status(), 404);
    let error: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(app.upstream.last_request().unwrap().path, path);
    assert_metric_reaches(
        &app,
        r#"llm_proxy_requests_total{route="passthrough",method="GET",status_class="4xx"}"#,
        1.0,
    )
    .await;
}

/// Waits for `count` access lines of `POST /v1/chat/completions` and returns them.
async fn chat_access_lines(proxy: &mut RunningProxy, count: usize) -> Vec<String> {
    let access = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("POST /v1/chat/completions status="))
            .map(str::to_string)
            .collect()
    };
    let mut log = String::new();
    eventually(Duration::from_secs(5), async || {
        log.push_str(&drain(&mut proxy.log));
        access(&log).len() >= count
    })
    .await;
    let lines = access(&log);
    assert_eq!(lines.len(), count, "{log}");
    lines
}

#[tokio::test]
async fn the_access_line_names_the_answer_s_model_when_the_body_was_not_read() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[]).await;
    let client = reqwest::Client::new();
    // No model in the request: the mock answers with its default, `gpt-mock`, and the proxy,
    // which reads no body for a caller without limits, can only have it from the answer.
    let plain = client
        .post(proxy.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    plain.bytes().await.unwrap();
    let stream = client
        .post(proxy.url("/v1/chat/completions"))
        .header("x-mock-chunks", "3")
        .json(&json!({"stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (text, broken) = read_stream(stream).await;
    assert!(!broken && text.contains("[DONE]"), "{text}");
    let lines = chat_access_lines(&mut proxy, 2).await;
    for (line, stream) in lines.iter().zip(["stream=false", "stream=true"]) {
        assert!(line.contains(stream), "{line}");
        assert!(line.contains(" model=gpt-mock "), "{line}");
    }
}
