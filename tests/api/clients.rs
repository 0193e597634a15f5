//! The clients file: who may call, which models, expiry, and what `/admin/clients` shows.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::helpers::*;

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "llm-proxy-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The proxy with `clients` as its clients file (`CLIENT_TOKEN` stays an unlimited client).
pub async fn spawn_with_clients(clients: &str) -> (TestApp, PathBuf) {
    let file = scratch_dir("clients").join("clients.toml");
    std::fs::write(&file, clients).unwrap();
    let app = spawn_app(&[("CLIENTS_FILE", file.to_str().unwrap())]).await;
    (app, file)
}

/// The `/metrics` text, read with the admin token.
pub async fn metrics(app: &TestApp) -> String {
    app.metrics_text().await
}

pub fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

const CLIENTS: &str = r#"
[clients.alice]
token = "tok-alice"
models = ["gpt-mock-mini", "gpt-4o-*"]

[clients.old]
token = "tok-old"
expires_at = 2020-01-01T00:00:00Z

[clients.off]
token = "tok-off"
disabled = true

[clients.hashed]
token_sha256 = "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92"
"#;

#[tokio::test]
async fn a_model_outside_the_list_is_refused_and_never_sent_upstream() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let refused = app.chat("tok-alice", chat_body("gpt-mock")).await;
    assert_json_error(
        refused,
        403,
        "model_not_allowed",
        "This client may not use the requested model",
    )
    .await;
    let embeddings = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth("tok-alice")
        .json(&json!({"model": "text-embedding-mock", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_json_error(
        embeddings,
        403,
        "model_not_allowed",
        "This client may not use the requested model",
    )
    .await;
    assert!(app.upstream.requests().is_empty(), "nothing went upstream");

    let allowed = app.chat("tok-alice", chat_body("gpt-4o-2024-08-06")).await;
    assert_eq!(allowed.status(), 200);
    let sent = app.upstream.last_request().unwrap();
    assert_eq!(sent.json().unwrap(), chat_body("gpt-4o-2024-08-06"));
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock-mini"))
            .await
            .status(),
        200
    );
    // Clients without a list may use any model.
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        200
    );
}

#[tokio::test]
async fn a_body_without_a_model_is_refused_for_a_client_with_a_list() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    for body in [json!({"messages": []}), json!({"model": ""})] {
        let refused = app.chat("tok-alice", body).await;
        assert_json_error(
            refused,
            400,
            "model_required",
            "The request body must name a model (a JSON \"model\" field or a model form field)",
        )
        .await;
    }
    let not_json = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("tok-alice")
        .body("model=gpt-mock-mini")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert!(app.upstream.requests().is_empty());
}

fn upload(boundary: &str, model: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn a_multipart_upload_is_checked_by_its_model_field_and_forwarded_unchanged() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let send = |body: Vec<u8>| {
        app.client
            .post(app.url("/v1/audio/transcriptions"))
            .bearer_auth("tok-alice")
            .header("content-type", "multipart/form-data; boundary=b0undary")
            .body(body)
            .send()
    };
    let refused = send(upload("b0undary", "whisper-1")).await.unwrap();
    assert_json_error(
        refused,
        403,
        "model_not_allowed",
        "This client may not use the requested model",
    )
    .await;
    assert!(app.upstream.requests().is_empty());

    let body = upload("b0undary", "gpt-4o-transcribe");
    let allowed = send(body.clone()).await.unwrap();
    assert_eq!(allowed.status(), 200);
    let echo: Value = allowed.json().await.unwrap();
    assert_eq!(echo["body_bytes"], body.len());
    assert_eq!(app.upstream.last_request().unwrap().body, body);
}

#[tokio::test]
async fn the_model_list_shows_each_client_only_its_models_from_one_cache() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let ids = |list: Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|model| model["id"].as_str().unwrap().to_string())
            .collect()
    };
    let everything = app.models().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(
        ids(everything),
        ["gpt-mock", "gpt-mock-mini", "text-embedding-mock"]
    );
    let alice = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth("tok-alice")
        .send()
        .await
        .unwrap();
    assert_eq!(alice.status(), 200);
    assert_eq!(alice.headers()["x-proxy-cache"], "HIT");
    let list: Value = alice.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(ids(list), ["gpt-mock-mini"]);
    assert_eq!(app.upstream.models_fetches(), 1);

    let one = |id: &str| {
        app.client
            .get(app.url(&format!("/v1/models/{id}")))
            .bearer_auth("tok-alice")
            .send()
    };
    assert_eq!(one("gpt-mock").await.unwrap().status(), 403);
    assert_eq!(one("gpt-mock-mini").await.unwrap().status(), 200);
}

#[tokio::test]
async fn expired_and_disabled_clients_get_the_answer_of_an_unknown_token() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    for token in ["tok-old", "tok-off", "tok-nobody"] {
        let refused = app.chat(token, chat_body("gpt-mock")).await;
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        assert_json_error(
            refused,
            401,
            "unauthorized",
            "Invalid or missing authorization token",
        )
        .await;
    }
    // token_sha256 = SHA-256("123456"): the file holds no token, the caller still gets in.
    assert_eq!(
        app.chat("123456", chat_body("gpt-mock")).await.status(),
        200
    );
    assert!(app.upstream.requests().len() == 1);
}

#[tokio::test]
async fn admin_clients_shows_limits_and_usage_but_never_a_token() {
    let (app, _) = spawn_with_clients(
        r#"
        [clients.alice]
        token = "tok-alice-secret"
        requests_per_minute = 60
        tokens_per_day = 100000
        models = ["gpt-mock"]
        expires_at = 2030-01-01T00:00:00Z
        "#,
    )
    .await;
    assert_eq!(
        app.chat("tok-alice-secret", chat_body("gpt-mock"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        200
    );
    let get = |token: &str| {
        app.client
            .get(app.url("/admin/clients"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get("tok-alice-secret").await.unwrap().status(), 401);
    let answer = get(ADMIN_TOKEN).await.unwrap();
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    for secret in ["tok-alice-secret", CLIENT_TOKEN, ADMIN_TOKEN, UPSTREAM_KEY] {
        assert!(!text.contains(secret), "{text}");
    }
    let listed: Value = serde_json::from_str(&text).unwrap();
    let alice = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|client| client["name"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(
        alice["limits"],
        json!({
            "requests_per_minute": 60,
            "tokens_per_day": 100000,
            "models": ["gpt-mock"],
            "expires_at": "2030-01-01T00:00:00Z",
            "disabled": false,
        })
    );
    // The mock reports 7 prompt + 6 completion tokens for a plain chat.
    assert_eq!(
        alice["usage"],
        json!({
            "requests_last_minute": 1,
            "tokens_last_minute": 13,
            "tokens_today": 13,
            "in_flight": 0,
            // Nothing is priced without prices.
            "usd_today": 0.0,
            "usd_this_month": 0.0,
            "refusals_last_hour": {},
        })
    );
    assert_eq!(alice["state"], "active");
    // A client without limits is counted all the same.
    let unlimited = &listed["clients"][0];
    assert_eq!(unlimited["limits"], json!({"disabled": false}));
    assert_eq!(unlimited["usage"]["requests_last_minute"], 1);
    assert_eq!(unlimited["usage"]["tokens_today"], 13);
}

#[tokio::test]
async fn a_clients_file_error_stops_start_up_naming_the_client_and_field() {
    let file = scratch_dir("bad-clients").join("clients.toml");
    std::fs::write(
        &file,
        "[clients.alice]\ntoken = \"tok-alice-secret\"\nrequests_per_minit = 5\n",
    )
    .unwrap();
    let output = Proxy::new()
        .env("AUTH_BEARER", "k")
        .clients_file(&file)
        .in_dir(file.parent().unwrap())
        .run(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CLIENTS_FILE") && stderr.contains("clients.alice.requests_per_minit"),
        "{stderr}"
    );
    assert!(!stderr.contains("tok-alice-secret"), "{stderr}");
}

#[tokio::test]
async fn a_body_read_for_its_model_that_stops_arriving_is_408_and_never_sent() {
    let file = scratch_dir("clients-slow-body").join("clients.toml");
    std::fs::write(&file, CLIENTS).unwrap();
    let app = spawn_app(&[
        ("CLIENTS_FILE", file.to_str().unwrap()),
        ("UPSTREAM_TIMEOUT_SECS", "1"),
    ])
    .await;
    app.assert_a_stalled_body_is_408("tok-alice").await;
}

#[tokio::test]
async fn another_spelling_of_a_model_endpoint_is_checked_all_the_same() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    for path in [
        "/v1/chat/completions/",
        "/v1//chat/completions",
        "/v1/chat/%63ompletions",
    ] {
        let refused = app
            .client
            .post(app.url(path))
            .bearer_auth("tok-alice")
            .json(&chat_body("gpt-mock"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{path}");
    }
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
}

#[test]
fn an_empty_clients_file_stops_start_up_unless_it_says_allow_empty() {
    let dir = scratch_dir("empty-clients");
    let file = dir.join("clients.toml");
    let start = || {
        Proxy::new()
            .env("AUTH_BEARER", "k")
            .clients_file(&file)
            .in_dir(&dir)
            .run(&[])
    };
    for text in ["", "# nobody yet\n", "[clients]\n"] {
        std::fs::write(&file, text).unwrap();
        let output = start();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
        assert!(
            stderr.contains("CLIENTS_FILE")
                && stderr.contains("has no clients")
                && stderr.contains("allow_empty = true"),
            "{text:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn an_allowed_empty_clients_file_leaves_only_the_allowed_tokens() {
    let (app, _) = spawn_with_clients("allow_empty = true\n").await;
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        200,
        "an ALLOWED_TOKENS entry still gets in"
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        401
    );
    assert_eq!(app.upstream.requests_started(), 1);
}
