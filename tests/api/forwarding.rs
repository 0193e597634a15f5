use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use warp::Filter;

use crate::helpers::*;

#[tokio::test]
async fn chat_is_forwarded_with_the_upstream_key_and_the_query_string() {
    let app = spawn_app(&[]).await;
    let response = app.authorised(reqwest::Method::POST, "/v1/chat/completions?api-version=2024-06-01&x=a%20b")
        .json(&serde_json::json!({"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req_mock_chat");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the mock upstream."
    );

    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.query.as_deref(),
        Some("api-version=2024-06-01&x=a%20b")
    );
    assert_eq!(
        seen.header_values("authorization"),
        [format!("Bearer {UPSTREAM_KEY}")]
    );
    assert_eq!(seen.json().unwrap()["messages"][0]["content"], "hi");
}

#[tokio::test]
async fn hop_by_hop_headers_and_client_credentials_are_dropped() {
    let app = spawn_app(&[]).await;
    let response = app
        .chat_request()
        .header("connection", "keep-alive, x-connection-scoped")
        .header("x-connection-scoped", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "trailers")
        .header("openai-organization", "org-123")
        .header("x-custom-end-to-end", "kept")
        .json(&serde_json::json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    for dropped in [
        "x-connection-scoped",
        "keep-alive",
        "proxy-authorization",
        "te",
    ] {
        assert_eq!(
            seen.header(dropped),
            None,
            "{dropped} must not reach the upstream"
        );
    }
    assert_ne!(
        seen.header("connection"),
        Some("keep-alive, x-connection-scoped")
    );
    assert_eq!(seen.header("openai-organization"), Some("org-123"));
    assert_eq!(seen.header("x-custom-end-to-end"), Some("kept"));
    assert_eq!(
        seen.header("host"),
        Some(app.upstream.addr().to_string().as_str())
    );
    let credentials: Vec<_> = seen
        .headers
        .iter()
        .filter(|(_, value)| value.contains(CLIENT_TOKEN))
        .collect();
    assert!(
        credentials.is_empty(),
        "the caller's token leaked upstream: {credentials:?}"
    );
}

#[tokio::test]
async fn upstream_hop_by_hop_response_headers_are_dropped() {
    let upstream = warp::any().map(|| {
        warp::http::Response::builder()
            .header("connection", "x-upstream-scoped")
            .header("x-upstream-scoped", "1")
            .header("x-ratelimit-remaining-tokens", "99")
            .body("ok")
            .unwrap()
    });
    let app = spawn_app_before_server(upstream, &[]).await;
    let response = app.chat(CLIENT_TOKEN, serde_json::json!({})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-upstream-scoped").is_none());
    assert_eq!(response.headers()["x-ratelimit-remaining-tokens"], "99");
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_headers_and_body() {
    let app = spawn_app(&[]).await;
    for status in [400u16, 401, 429, 500, 503] {
        let direct = app
            .client
            .post(format!("{}/v1/chat/completions", app.upstream.base_url()))
            .header("x-mock-status", status.to_string())
            .body("{}")
            .send()
            .await
            .unwrap();
        let direct_length = direct.headers()["content-length"].clone();
        let direct = direct.bytes().await.unwrap();
        let response = app
            .chat_request()
            .header("x-mock-status", status.to_string())
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status);
        let headers = response.headers();
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["x-ratelimit-limit-requests"], "100");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        assert_eq!(headers["x-request-id"], "req_mock_error");
        assert_eq!(headers["openai-processing-ms"], "1");
        assert_eq!(
            headers["content-length"], direct_length,
            "framing kept for status {status}"
        );
        assert_eq!(response.bytes().await.unwrap(), direct, "status {status}");
    }
}

#[tokio::test]
async fn other_v1_endpoints_are_forwarded() {
    let app = spawn_app(&[]).await;
    let embeddings = app
        .authorised(reqwest::Method::POST, "/v1/embeddings")
        .json(&serde_json::json!({"model": "text-embedding-mock", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 200);
    let body: serde_json::Value = embeddings.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let response = app
            .authorised(method.parse().unwrap(), "/v1/files/file-1/content?limit=2")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let echo: serde_json::Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/v1/files/file-1/content");
        assert_eq!(echo["query"], "limit=2");
        let seen = app.upstream.last_request().unwrap();
        assert_eq!(
            seen.header("transfer-encoding"),
            None,
            "no body was invented for {method}"
        );
    }
}

#[tokio::test]
async fn multipart_uploads_and_chunked_bodies_arrive_intact() {
    let app = spawn_app(&[]).await;
    let boundary = "proxy-test-boundary";
    let audio: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut multipart = Vec::new();
    multipart.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    multipart.extend_from_slice(&audio);
    multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let response = app
        .authorised(reqwest::Method::POST, "/v1/audio/transcriptions")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(multipart.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.body.as_ref(), multipart.as_slice());
    assert_eq!(
        seen.header("content-length"),
        Some(multipart.len().to_string().as_str())
    );

    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = multipart
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = app
        .authorised(reqwest::Method::POST, "/v1/uploads/part")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(
        seen.body.len(),
        multipart.len(),
        "a chunked upload arrives whole"
    );
    assert_eq!(seen.body.as_ref(), multipart.as_slice());
}

#[tokio::test]
async fn target_host_path_prefix_is_kept() {
    let upstream = MockUpstream::start().await;
    let target = format!("{}/openai/", upstream.base_url());
    let app = spawn_app_with_upstream(
        upstream,
        &[
            ("TARGET_HOST", target.as_str()),
            ("AUTH_BEARER", UPSTREAM_KEY),
        ],
    )
    .await;
    app.chat("t", serde_json::json!({})).await;
    assert_eq!(
        app.upstream.last_request().unwrap().path,
        "/openai/v1/chat/completions"
    );
}

#[tokio::test]
async fn unreachable_upstream_gives_a_quick_502() {
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let target = format!("http://{closed}");
    let app = spawn_app(&[("TARGET_HOST", target.as_str())]).await;
    let started = Instant::now();
    let response = app.chat(CLIENT_TOKEN, serde_json::json!({})).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_json_error(
        response,
        502,
        "bad_gateway",
        "The upstream server could not be reached",
    )
    .await;

    let models = app.models().await;
    assert_json_error(
        models.unwrap(),
        502,
        "bad_gateway",
        "The upstream server could not be reached",
    )
    .await;
}

#[tokio::test]
async fn upstream_redirects_are_returned_not_followed() {
    let upstream = warp::any().map(|| {
        warp::http::Response::builder()
            .status(307)
            .header("location", "http://127.0.0.1:9/elsewhere")
            .body("")
            .unwrap()
    });
    let app = spawn_app_before_server(upstream, &[]).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_redirects
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 307);
    assert_eq!(
        response.headers()["location"],
        "http://127.0.0.1:9/elsewhere"
    );
}

#[tokio::test]
async fn caller_credentials_never_reach_the_upstream_whatever_header_the_key_goes_in() {
    let app = spawn_app(&[
        ("DEFAULT_AUTH_HEADER", "x-proxy-token"),
        ("UPSTREAM_AUTH_HEADER", "api-key"),
    ])
    .await;
    let protocols = format!("realtime, openai-insecure-api-key.{CLIENT_TOKEN}");
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-proxy-token", CLIENT_TOKEN)
        .header("authorization", "Bearer sk-callers-own-openai-key")
        .header("api-key", "callers-own-azure-key")
        .header("sec-websocket-protocol", protocols.as_str())
        .json(&serde_json::json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.header_values("api-key"), [UPSTREAM_KEY]);
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("x-proxy-token"), None);
    assert_eq!(seen.header("sec-websocket-protocol"), Some("realtime"));
    assert!(
        seen.headers
            .iter()
            .all(|(_, value)| !value.contains(CLIENT_TOKEN)),
        "{:?}",
        seen.headers
    );
}
