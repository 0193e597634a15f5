//! Metrics, health endpoints, request ids and structured logs, checked against real traffic.

use std::collections::HashMap;
use std::time::Duration;

use llm_proxy::auth::token_label;
use llm_proxy::config::Secret;
use tokio::io::AsyncWriteExt;

use crate::helpers::*;

/// Every sample of the exposition, keyed by `name{labels}` as written.
async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let response = app
        .request_as(ADMIN_TOKEN, reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            (series.to_string(), value.parse().expect("numeric sample"))
        })
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until `check` holds: the last access record of a response is written just after its
/// final bytes leave, so a scrape can race it by a few microseconds.
async fn scrape_until(
    app: &TestApp,
    check: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let sample = eventually(Duration::from_secs(2), async || {
        Some(scrape(app).await).filter(|sample| check(sample))
    })
    .await;
    match sample {
        Some(sample) => sample,
        None => scrape(app).await,
    }
}

#[tokio::test]
async fn traffic_moves_the_counters_by_exactly_what_happened() {
    let app = spawn_app(&[("ALLOWED_TOKENS", "alice:tok-alice, tok-plain")]).await;
    let plain = token_label(&Secret::new("tok-plain"));
    let before = scrape(&app).await;

    let chat = app
        .chat("tok-alice", serde_json::json!({"model": "gpt-mock"}))
        .await;
    assert_eq!(chat.status(), 200);
    chat.bytes().await.unwrap();
    let streamed = app
        .request_as("tok-plain", reqwest::Method::POST, "/v1/chat/completions")
        .header("x-mock-chunks", "4")
        .json(&serde_json::json!({"stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert!(streamed.text().await.unwrap().ends_with("[DONE]\n\n"));
    for _ in 0..2 {
        let models = app
            .request_as("tok-plain", reqwest::Method::GET, "/v1/models")
            .send()
            .await;
        models.unwrap().bytes().await.unwrap();
    }
    let rejected = app
        .request_as("nope", reqwest::Method::GET, "/v1/models")
        .send()
        .await;
    assert_eq!(rejected.unwrap().status(), 401);
    for status in ["429", "503"] {
        let failed = app
            .request_as("tok-alice", reqwest::Method::POST, "/v1/chat/completions")
            .header("x-mock-status", status)
            .send()
            .await
            .unwrap();
        failed.bytes().await.unwrap();
    }

    let chat_2xx = r#"llm_proxy_requests_total{route="chat",method="POST",status_class="2xx"}"#;
    let after = scrape_until(&app, |sample| delta(&before, sample, chat_2xx) == 2.0).await;
    let expect = |series: &str, value: f64| {
        assert_eq!(delta(&before, &after, series), value, "{series}");
    };
    expect(chat_2xx, 2.0);
    expect(
        r#"llm_proxy_requests_total{route="chat",method="POST",status_class="4xx"}"#,
        1.0,
    );
    expect(
        r#"llm_proxy_requests_total{route="chat",method="POST",status_class="5xx"}"#,
        1.0,
    );
    expect(
        r#"llm_proxy_requests_total{route="models",method="GET",status_class="2xx"}"#,
        2.0,
    );
    expect(
        r#"llm_proxy_requests_total{route="models",method="GET",status_class="4xx"}"#,
        1.0,
    );
    // The mock reports 7 prompt and 6 completion tokens for a plain answer, and 7 prompt plus one
    // completion token per content chunk for a stream.
    expect(
        r#"llm_proxy_tokens_total{client="alice",kind="prompt"}"#,
        7.0,
    );
    expect(
        r#"llm_proxy_tokens_total{client="alice",kind="completion"}"#,
        6.0,
    );
    expect(
        r#"llm_proxy_tokens_total{client="alice",kind="total"}"#,
        13.0,
    );
    expect(
        &format!(r#"llm_proxy_tokens_total{{client="{plain}",kind="prompt"}}"#),
        7.0,
    );
    expect(
        &format!(r#"llm_proxy_tokens_total{{client="{plain}",kind="completion"}}"#),
        4.0,
    );
    expect(
        &format!(r#"llm_proxy_tokens_total{{client="{plain}",kind="total"}}"#),
        11.0,
    );
    expect("llm_proxy_models_cache_misses_total", 1.0);
    expect("llm_proxy_models_cache_hits_total", 1.0);
    expect("llm_proxy_models_cache_fetches_total", 1.0);
    expect(
        r#"llm_proxy_upstream_failures_total{kind="status_4xx"}"#,
        1.0,
    );
    expect(
        r#"llm_proxy_upstream_failures_total{kind="status_5xx"}"#,
        1.0,
    );
    expect(
        r#"llm_proxy_request_duration_seconds_count{route="chat"}"#,
        4.0,
    );
    expect(
        r#"llm_proxy_time_to_first_byte_seconds_count{route="chat"}"#,
        4.0,
    );
    expect(r#"llm_proxy_overhead_seconds_count{route="chat"}"#, 4.0);
    assert_eq!(after["llm_proxy_streams_in_flight"], 0.0);
    // The scrape itself is the one request in flight.
    assert_eq!(after["llm_proxy_requests_in_flight"], 1.0);
    for series in after.keys() {
        for secret in ["tok-alice", "tok-plain", UPSTREAM_KEY, ADMIN_TOKEN] {
            assert!(!series.contains(secret), "{series}");
        }
    }
}

#[tokio::test]
async fn in_flight_gauges_count_open_streams() {
    let app = spawn_app(&[]).await;
    let response = app.stream_chat(10, 100).send().await.unwrap();
    let during = scrape(&app).await;
    assert_eq!(during["llm_proxy_streams_in_flight"], 1.0);
    assert_eq!(
        during["llm_proxy_requests_in_flight"], 2.0,
        "the stream and the scrape"
    );
    response.bytes().await.unwrap();
    let after = scrape_until(&app, |s| s["llm_proxy_streams_in_flight"] == 0.0).await;
    assert_eq!(after["llm_proxy_streams_in_flight"], 0.0);
}

#[tokio::test]
async fn upstream_failures_are_counted_by_kind() {
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let app = spawn_app(&[("TARGET_HOST", &closed)]).await;
    app.chat(CLIENT_TOKEN, serde_json::json!({}))
        .await
        .bytes()
        .await
        .unwrap();
    let sample = scrape(&app).await;
    assert_eq!(
        sample[r#"llm_proxy_upstream_failures_total{kind="connect"}"#],
        1.0
    );

    let app = spawn_app(&[("UPSTREAM_TIMEOUT_SECS", "1")]).await;
    let slow = app
        .chat_request()
        .header("x-mock-delay-ms", "3000")
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 504);
    let sample = scrape(&app).await;
    assert_eq!(
        sample[r#"llm_proxy_upstream_failures_total{kind="timeout"}"#],
        1.0
    );

    let (target, _) = spawn_raw_upstream(|mut socket| async move {
        let _ = socket
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
            .await;
    })
    .await;
    let app = spawn_app(&[("TARGET_HOST", &target)]).await;
    let broken = app.chat(CLIENT_TOKEN, serde_json::json!({})).await;
    assert!(broken.bytes().await.is_err());
    let sample = scrape_until(&app, |s| {
        s.get(r#"llm_proxy_upstream_failures_total{kind="reset"}"#) == Some(&1.0)
    })
    .await;
    assert_eq!(
        sample[r#"llm_proxy_upstream_failures_total{kind="reset"}"#],
        1.0
    );
}

#[tokio::test]
async fn metrics_are_protected_by_metrics_token_then_admin_token() {
    let app = spawn_app(&[("METRICS_TOKEN", "scrape-token")]).await;
    let get = |token: Option<&str>| {
        let mut request = app.client.get(app.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some(ADMIN_TOKEN)).await.unwrap().status(), 401);
    assert_eq!(get(Some(CLIENT_TOKEN)).await.unwrap().status(), 401);
    assert_eq!(get(Some("scrape-token")).await.unwrap().status(), 200);

    let app = spawn_app(&[]).await;
    let unauthenticated = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(
        unauthenticated.status(),
        401,
        "ADMIN_TOKEN protects it when set"
    );

    let app = spawn_app(&[("ADMIN_TOKEN", "")]).await;
    let open = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(open.status(), 200, "open without either token");
}

#[tokio::test]
async fn health_endpoints_need_no_token_and_readiness_ends_with_the_drain() {
    let mut app = spawn_app(&[]).await;
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let stream = app.stream_chat(10, 100).send().await.unwrap();
    let routes = llm_proxy::routes(app.state.clone());
    let server = app.begin_shutdown();
    assert!(eventually(Duration::from_secs(2), async || app.state.is_draining()).await);
    let ready = warp::test::request().path("/readyz").reply(&routes).await;
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.body().as_ref(),
        br#"{"limits":"local","status":"draining"}"#
    );
    let alive = warp::test::request().path("/healthz").reply(&routes).await;
    assert_eq!(alive.status(), 200, "alive while draining");
    stream.bytes().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn request_ids_are_accepted_forwarded_and_returned() {
    let app = spawn_app(&[]).await;
    let response = app
        .chat_request()
        .header("x-request-id", "trace-42.a:b")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-proxy-request-id"], "trace-42.a:b");
    assert_eq!(
        response.headers()["x-request-id"],
        "req_mock_chat",
        "the upstream's own id"
    );
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.header_values("x-request-id"), ["trace-42.a:b"]);

    // Sent by hand: reqwest refuses some of these values, and each must really be tried.
    let with_id = |id: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
             x-request-id: {id}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
    };
    for unusable in ["a b", &"x".repeat(200), "\u{e9}t\u{e9}"] {
        let reply = raw_exchange(
            app.addr,
            with_id(unusable).as_bytes(),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(reply.status(), 200, "{unusable:?}: {}", reply.text);
        let generated = reply
            .header("x-proxy-request-id")
            .expect("an id")
            .to_string();
        assert_eq!(generated.len(), 16, "{generated}");
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
        let seen = app.upstream.last_request().unwrap();
        assert_eq!(seen.header_values("x-request-id"), [generated.as_str()]);
    }
    let forwarded = app.upstream.requests().len();

    // A control byte is not a header value at all: hyper's parser refuses the request before
    // the proxy sees it, so there is no id to replace and nothing goes upstream.
    let reply = raw_exchange(
        app.addr,
        with_id("id\u{7f}").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(reply.status(), 400, "{}", reply.text);
    assert_eq!(reply.header("x-proxy-request-id"), None, "{}", reply.text);
    assert!(reply.closed);
    assert_eq!(app.upstream.requests_started(), forwarded);

    for (path, status) in [("/nowhere", 404), ("/v1/models", 401)] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["x-proxy-request-id"].len(), 16, "{path}");
    }
    let first = app.client.get(app.url("/healthz")).send().await.unwrap();
    let second = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_ne!(
        first.headers()["x-proxy-request-id"],
        second.headers()["x-proxy-request-id"]
    );
}
