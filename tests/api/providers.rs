//! Providers whose OpenAI-compatible base URL is not `<host>/v1`: `TARGET_BASE_URL`, the key in
//! another header (`UPSTREAM_AUTH_HEADER`), and query parameters added upstream (`UPSTREAM_QUERY`).

use mock_upstream::MockOptions;
use serde_json::json;

use crate::helpers::*;

fn mounted(mount: &str) -> MockOptions {
    MockOptions {
        mount: Some(mount.to_string()),
        ..MockOptions::default()
    }
}

fn azure_deployment() -> MockOptions {
    MockOptions {
        mount: Some("/openai/deployments/D".to_string()),
        azure: true,
        ..MockOptions::default()
    }
}

fn hello() -> serde_json::Value {
    json!({"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn base_urls_without_v1_receive_the_rest_of_the_path() {
    // Zhipu GLM and Google Gemini, as their documentation spells the base URL.
    for mount in ["/api/paas/v4", "/v1beta/openai", "/api/v3"] {
        let app = spawn_app_mounted(mounted(mount), &[]).await;
        let response = app.chat(CLIENT_TOKEN, hello()).await;
        assert_eq!(response.status(), 200, "{mount}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion", "{mount}");
        let seen = app.upstream.last_request().unwrap();
        assert_eq!(seen.path, format!("{mount}/chat/completions"));
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {UPSTREAM_KEY}").as_str())
        );
    }
}

#[tokio::test]
async fn the_model_list_is_cached_from_the_base_url() {
    let app = spawn_app_mounted(mounted("/api/paas/v4"), &[]).await;
    for expected in ["MISS", "HIT"] {
        let response = app.models().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-proxy-cache"], expected);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["object"], "list");
    }
    assert_eq!(app.upstream.models_fetches(), 1);
    assert_eq!(
        app.upstream.last_request().unwrap().path,
        "/api/paas/v4/models"
    );
}

#[tokio::test]
async fn an_azure_deployment_gets_its_api_key_header_and_api_version() {
    let app = spawn_app_mounted(
        azure_deployment(),
        &[
            ("UPSTREAM_AUTH_HEADER", "api-key"),
            ("UPSTREAM_QUERY", "api-version=2024-10-21"),
        ],
    )
    .await;
    let response = app
        .client
        .post(app.url("/v1/chat/completions?trace=1&api-version=1999-01-01"))
        .bearer_auth(CLIENT_TOKEN)
        // The caller's own api-key must not reach the upstream.
        .header("api-key", "caller-supplied")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.path, "/openai/deployments/D/chat/completions");
    assert_eq!(
        seen.query.as_deref(),
        Some("trace=1&api-version=2024-10-21"),
        "the caller's parameters are kept; the configured one wins the clash"
    );
    assert_eq!(seen.header_values("api-key"), [UPSTREAM_KEY]);
    assert_eq!(seen.header("authorization"), None, "no bearer for Azure");
}

#[tokio::test]
async fn the_azure_like_mock_refuses_what_the_proxy_used_to_send() {
    // Without the new settings the request is what the proxy always sent: a bearer key and no
    // api-version. The mock refuses it, so the test above proves the settings, not the mock.
    let app = spawn_app_mounted(azure_deployment(), &[]).await;
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.status(), 401);
    let app = spawn_app_mounted(azure_deployment(), &[("UPSTREAM_AUTH_HEADER", "api-key")]).await;
    let response = app.chat(CLIENT_TOKEN, hello()).await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn an_azure_v1_base_url_with_x_api_key_style_header_gets_the_bare_key() {
    let app = spawn_app_mounted(
        mounted("/openai/v1"),
        &[("UPSTREAM_AUTH_HEADER", "x-api-key")],
    )
    .await;
    let response = app.models().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.path, "/openai/v1/models");
    assert_eq!(seen.header_values("x-api-key"), [UPSTREAM_KEY]);
    assert_eq!(seen.header("authorization"), None);
}

#[tokio::test]
async fn deeper_paths_keep_their_rest_under_the_base_url() {
    let app = spawn_app_mounted(mounted("/api/paas/v4"), &[]).await;
    let response = app
        .client
        .get(app.url("/v1/models/gpt-mock"))
        .bearer_auth(CLIENT_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        app.upstream.last_request().unwrap().path,
        "/api/paas/v4/models/gpt-mock"
    );
}
