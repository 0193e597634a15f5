//! `ERROR_FORMAT=openai`: the proxy's own errors as OpenAI's error object, with the status and
//! headers of the default format; and the concurrency refusal's `x-ratelimit-*` pair.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::clients::{chat_body, scratch_dir, spawn_with_clients};
use crate::helpers::*;
use crate::process::run_with;

const CLIENTS: &str = r#"
[clients.once]
token = "tok-once"
requests_per_minute = 1

[clients.picky]
token = "tok-picky"
models = ["gpt-allowed"]
"#;

/// The headers of an answer, those whose value depends on the moment, the request or the body
/// (`date`, the request id, the waits, the length) by name only.
fn comparable_headers(response: &reqwest::Response) -> BTreeMap<String, String> {
    response
        .headers()
        .iter()
        .map(|(name, value)| {
            let varies = matches!(
                name.as_str(),
                "date" | "x-proxy-request-id" | "retry-after" | "content-length"
            ) || name.as_str().starts_with("x-ratelimit-reset-");
            let value = if varies {
                "(varies)"
            } else {
                value.to_str().unwrap()
            };
            (name.to_string(), value.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn with_error_format_openai_the_proxys_errors_are_openai_error_objects_with_the_same_headers()
{
    let (proxy_format, _) = spawn_with_clients(CLIENTS).await;
    let file = scratch_dir("clients-openai").join("clients.toml");
    std::fs::write(&file, CLIENTS).unwrap();
    let openai = spawn_app(&[
        ("CLIENTS_FILE", file.to_str().unwrap()),
        ("ERROR_FORMAT", "openai"),
    ])
    .await;

    // The one request `tok-once` may make this minute, on each proxy.
    for app in [&proxy_format, &openai] {
        assert_eq!(
            app.chat("tok-once", chat_body("gpt-mock")).await.status(),
            200
        );
    }

    // (status, code, OpenAI type, message, how to ask)
    type Ask = fn(&TestApp) -> reqwest::RequestBuilder;
    let cases: [(u16, &str, &str, &str, Ask); 5] = [
        (
            401,
            "unauthorized",
            "authentication_error",
            "Invalid or missing authorization token",
            |app| {
                app.request_as("wrong-token", reqwest::Method::POST, "/v1/chat/completions")
                    .json(&chat_body("gpt-mock"))
            },
        ),
        (
            404,
            "not_found",
            "invalid_request_error",
            "No such route",
            |app| app.authorised(reqwest::Method::GET, "/models"),
        ),
        (
            405,
            "method_not_allowed",
            "invalid_request_error",
            "This route does not accept that HTTP method",
            |app| app.client.post(app.url("/healthz")),
        ),
        (
            403,
            "model_not_allowed",
            "permission_error",
            "This client may not use the requested model",
            |app| {
                app.request_as("tok-picky", reqwest::Method::POST, "/v1/chat/completions")
                    .json(&chat_body("gpt-other"))
            },
        ),
        (
            429,
            "rate_limited",
            "rate_limit_error",
            "This client is over its rate limit; retry after the time in Retry-After",
            |app| {
                app.request_as("tok-once", reqwest::Method::POST, "/v1/chat/completions")
                    .json(&chat_body("gpt-mock"))
            },
        ),
    ];
    for (status, code, kind, message, ask) in cases {
        let default = ask(&proxy_format).send().await.unwrap();
        let answer = ask(&openai).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), status, "{code}");
        assert_eq!(
            comparable_headers(&answer),
            comparable_headers(&default),
            "{code}: the same headers in both formats"
        );
        assert_json_error(default, status, code, message).await;
        let body: Value = answer.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": message, "type": kind, "code": code, "param": null}}),
            "{code}"
        );
    }
    assert_eq!(
        openai.upstream.requests().len(),
        1,
        "only the admitted request went upstream"
    );
}

#[tokio::test]
async fn with_error_format_openai_a_gateway_error_is_an_openai_server_error() {
    // A port nothing listens on: refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = spawn_app(&[("TARGET_HOST", &target), ("ERROR_FORMAT", "openai")]).await;
    let response = app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": "The upstream server could not be reached",
            "type": "server_error",
            "code": "bad_gateway",
            "param": null
        }})
    );
}

#[tokio::test]
async fn with_error_format_openai_a_stalled_stream_ends_with_an_openai_error_event() {
    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        let event = "data: {\"choices\":[]}\n\n";
        reply.extend(format!("{:x}\r\n{event}\r\n", event.len()).into_bytes());
        socket.write_all(&reply).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let app = spawn_app(&[
        ("TARGET_HOST", &target),
        ("STREAM_IDLE_TIMEOUT_SECS", "1"),
        ("ERROR_FORMAT", "openai"),
    ])
    .await;
    let (received, truncated) = read_stream(app.stream_chat(5, 10).send().await.unwrap()).await;
    assert_eq!(
        received,
        "data: {\"choices\":[]}\n\n\
         data: {\"error\":{\"message\":\"The upstream stopped sending data; the response is \
         incomplete\",\"type\":\"server_error\",\"code\":\"upstream_stream_stalled\",\
         \"param\":null}}\n\n"
    );
    assert!(truncated, "the response must not end cleanly");
}

#[tokio::test]
async fn a_concurrency_refusal_carries_the_concurrency_limit_as_x_ratelimit_headers() {
    let (app, _) = spawn_with_clients(
        "[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 2\n\
         requests_per_minute = 100\n",
    )
    .await;
    let hold = || {
        app.request_as("tok-alice", reqwest::Method::POST, "/v1/chat/completions")
            .header("x-mock-chunks", "10")
            .header("x-mock-interval-ms", "100")
            .json(&json!({"model": "gpt-mock", "stream": true}))
            .send()
    };
    let first = hold().await.unwrap();
    let second = hold().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    // An admitted answer tells the per-minute limits only: what is free of the concurrency
    // changes as other requests end, so a figure here would be stale at once.
    assert_eq!(second.headers()["x-ratelimit-limit-requests"], "100");
    assert!(
        second
            .headers()
            .get("x-ratelimit-limit-concurrency")
            .is_none()
    );

    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    let headers = refused.headers();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-ratelimit-limit-concurrency"], "2");
    assert_eq!(headers["x-ratelimit-remaining-concurrency"], "0");
    assert!(
        headers.get("x-ratelimit-reset-concurrency").is_none(),
        "when a place frees is not known"
    );
    // Beside the client's other limit, as on every refusal.
    assert_eq!(headers["x-ratelimit-limit-requests"], "100");
    assert!(headers.contains_key("x-ratelimit-remaining-requests"));
    assert_json_error(
        refused,
        429,
        "rate_limited",
        "This client is over its rate limit; retry after the time in Retry-After",
    )
    .await;
    first.bytes().await.unwrap();
    second.bytes().await.unwrap();
}

#[tokio::test]
async fn a_refusal_by_another_limit_has_no_concurrency_headers() {
    let (app, _) = spawn_with_clients(
        "[clients.alice]\ntoken = \"tok-alice\"\nmax_concurrent_requests = 2\n\
         requests_per_minute = 1\n",
    )
    .await;
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(
        refused
            .headers()
            .get("x-ratelimit-limit-concurrency")
            .is_none()
    );
}

#[test]
fn an_unknown_error_format_stops_start_up_naming_the_variable_and_the_accepted_values() {
    let output = run_with(&[("AUTH_BEARER", "k"), ("ERROR_FORMAT", "xml")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "configuration error: ERROR_FORMAT: \"xml\" is not an error format (accepted: proxy, openai)"
    );
}
