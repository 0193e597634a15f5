use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mock_upstream::MockUpstream;
use warp::Filter;

use crate::helpers::*;

#[tokio::test]
async fn models_are_fetched_once_and_then_served_from_cache() {
    let app = spawn_app(&[]).await;
    let direct = reqwest::get(format!("{}/v1/models", app.upstream.base_url()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let before = app.upstream.models_fetches();

    let mut answers = Vec::new();
    for _ in 0..3 {
        let response = app.models().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let cache = response.headers()["x-proxy-cache"]
            .to_str()
            .unwrap()
            .to_string();
        answers.push((cache, response.bytes().await.unwrap()));
    }
    assert_eq!(app.upstream.models_fetches() - before, 1);
    assert_eq!(answers[0].0, "MISS");
    assert_eq!(answers[1].0, "HIT");
    assert_eq!(answers[2].0, "HIT");
    for (_, body) in &answers {
        assert_eq!(
            body, &direct,
            "the cached body is the upstream's, byte for byte"
        );
    }
    let fetch = app.upstream.last_request().unwrap();
    assert_eq!(
        fetch.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
}

/// An upstream whose model list fails `failures` times with 503, then succeeds after `delay`.
async fn flaky_models_upstream(failures: usize, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let route = warp::path!("v1" / "models").and_then(move || {
        let attempt = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            let (status, body) = if attempt < failures {
                (
                    503,
                    r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
                )
            } else {
                (
                    200,
                    r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#,
                )
            };
            Ok::<_, std::convert::Infallible>(
                warp::http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("retry-after", "7")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let addr = spawn_server(route).await;
    (format!("http://{addr}"), fetches)
}

#[tokio::test]
async fn models_errors_are_passed_through_and_not_cached() {
    let (target, fetches) = flaky_models_upstream(1, Duration::ZERO).await;
    let app = spawn_app(&[("TARGET_HOST", target.as_str())]).await;
    let get = || app.models();

    let failed = get().await.unwrap();
    assert_eq!(failed.status(), 503);
    assert_eq!(failed.headers()["retry-after"], "7");
    assert!(failed.text().await.unwrap().contains("overloaded"));

    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "the error was not cached, the success was"
    );
}

#[tokio::test]
async fn concurrent_cold_misses_make_one_upstream_fetch() {
    let (target, fetches) = flaky_models_upstream(0, Duration::from_millis(300)).await;
    let app = spawn_app(&[("TARGET_HOST", target.as_str())]).await;
    let requests = (0..40).map(|_| app.models());
    for response in futures::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn models_with_a_query_string_bypass_the_cache() {
    let app = spawn_app(&[]).await;
    for _ in 0..2 {
        let response = app
            .authorised(reqwest::Method::GET, "/v1/models?owned_by=mock")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("x-proxy-cache").is_none());
    }
    assert_eq!(app.upstream.models_fetches(), 2);
    assert_eq!(
        app.upstream.last_request().unwrap().query.as_deref(),
        Some("owned_by=mock")
    );
}

#[tokio::test]
async fn a_single_model_is_forwarded_not_cached() {
    let upstream = MockUpstream::start().await;
    let target = upstream.base_url();
    let app = spawn_app_with_upstream(
        upstream,
        &[
            ("TARGET_HOST", target.as_str()),
            ("AUTH_BEARER", UPSTREAM_KEY),
        ],
    )
    .await;
    let response = app
        .client
        .get(app.url("/v1/models/gpt-mock"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["id"], "gpt-mock");
}
