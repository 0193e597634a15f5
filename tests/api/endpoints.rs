//! Which endpoints a client with a `models` list may reach: each checked where it names its
//! model, or refused when it can generate without naming one the proxy can read, unless the
//! client's `endpoints` list allows it.

use reqwest::Method;
use serde_json::{Value, json};

use crate::clients::{chat_body, metrics, spawn_with_clients};
use crate::helpers::*;

const CLIENTS: &str = r#"
[clients.mini]
token = "tok-mini"
models = ["gpt-4o-mini"]

[clients.batcher]
token = "tok-batcher"
models = ["gpt-4o-mini"]
endpoints = ["/v1/batches*", "/v1/evals/*", "/v1/realtime/calls"]

[clients.counted]
token = "tok-counted"
tokens_per_day = 1000000
"#;

const NOT_ALLOWED: &str = "This client may not use the requested model";
const NO_MODEL: &str =
    "The request body must name a model (a JSON \"model\" field or a model form field)";
const ENDPOINT_NOT_ALLOWED: &str = "This client may not call this endpoint: it can generate without naming a model the proxy can check";

/// `method path` as `token` with a JSON body.
async fn send(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    body: Value,
) -> reqwest::Response {
    app.request_as(token, method, path)
        .json(&body)
        .send()
        .await
        .expect("request to the proxy failed")
}

/// A WebRTC call's offer: the SDP and the session, as a form.
fn call_offer(model: &str) -> String {
    let session = json!({"type": "realtime", "model": model});
    format!(
        "--b0undary\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n\
         v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\n\r\n--b0undary\r\n\
         Content-Disposition: form-data; name=\"session\"\r\n\r\n{session}\r\n--b0undary--\r\n"
    )
}

async fn post_call(app: &TestApp, token: &str, model: &str) -> reqwest::Response {
    app.request_as(token, Method::POST, "/v1/realtime/calls")
        .header("content-type", "multipart/form-data; boundary=b0undary")
        .body(call_offer(model))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_disallowed_model_is_refused_wherever_the_endpoint_names_it() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let realtime = |model: &str| json!({"type": "realtime", "model": model});
    let cases = [
        (
            Method::POST,
            "/v1/realtime/client_secrets",
            json!({"session": realtime("gpt-realtime")}),
        ),
        // The other place is checked too: the upstream may read either.
        (
            Method::POST,
            "/v1/realtime/client_secrets",
            json!({"model": "gpt-4o-mini", "session": realtime("gpt-realtime")}),
        ),
        (
            Method::POST,
            "/v1/realtime/client_secrets",
            json!({"model": "gpt-realtime", "session": realtime("gpt-4o-mini")}),
        ),
        (
            Method::POST,
            "/v1/realtime/sessions",
            json!({"model": "gpt-realtime", "voice": "alloy"}),
        ),
        (
            Method::POST,
            "/v1/realtime/sessions",
            json!({"model": "gpt-4o-mini", "session": {"model": "gpt-realtime"}}),
        ),
        (
            Method::POST,
            "/v1/realtime/calls/rtc_1/accept",
            realtime("gpt-realtime"),
        ),
        (
            Method::POST,
            "/v1/videos",
            json!({"model": "sora-2", "prompt": "a cat"}),
        ),
        (
            Method::POST,
            "/v1/responses/compact",
            json!({"model": "gpt-5", "input": []}),
        ),
        // PUT and PATCH are checked like POST.
        (Method::PUT, "/v1/chat/completions", chat_body("gpt-4")),
        (
            Method::PATCH,
            "/v1/responses",
            json!({"model": "gpt-4", "input": "hi"}),
        ),
    ];
    for (method, path, body) in cases {
        let refused = send(&app, "tok-mini", method.clone(), path, body.clone()).await;
        assert_eq!(refused.status(), 403, "{method} {path} {body}");
        assert_json_error(refused, 403, "model_not_allowed", NOT_ALLOWED).await;
    }
    // A session that names no model of its own gets the upstream's default: not checkable.
    let unnamed = [
        (
            "/v1/realtime/client_secrets",
            json!({"model": "gpt-4o-mini", "session": {"type": "realtime"}}),
        ),
        ("/v1/realtime/client_secrets", json!({})),
        (
            "/v1/realtime/sessions",
            json!({"session": {"model": "gpt-4o-mini"}}),
        ),
    ];
    for (path, body) in unnamed {
        let refused = send(&app, "tok-mini", Method::POST, path, body).await;
        assert_json_error(refused, 400, "model_required", NO_MODEL).await;
    }
    // A name given twice, which upstream parsers settle differently (`json!` would keep one).
    let twice = app
        .request_as("tok-mini", Method::POST, "/v1/realtime/client_secrets")
        .header("content-type", "application/json")
        .body(r#"{"session":{"type":"realtime","model":"gpt-4o-mini","model":"gpt-realtime"}}"#)
        .send()
        .await
        .unwrap();
    assert_json_error(twice, 400, "model_required", NO_MODEL).await;
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
    assert!(metrics(&app).await.contains(
        "llm_proxy_limit_refusals_total{client=\"mini\",reason=\"model_not_allowed\"} 10"
    ));
}

#[tokio::test]
async fn an_allowed_model_passes_wherever_the_endpoint_names_it_and_goes_unchanged() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let cases = [
        (
            Method::POST,
            "/v1/realtime/client_secrets",
            json!({"session": {"type": "realtime", "model": "gpt-4o-mini"}}),
        ),
        (
            Method::POST,
            "/v1/realtime/sessions",
            json!({"model": "gpt-4o-mini", "voice": "alloy"}),
        ),
        (
            Method::PUT,
            "/v1/chat/completions",
            chat_body("gpt-4o-mini"),
        ),
        (
            Method::PATCH,
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "hi"}),
        ),
    ];
    for (method, path, body) in cases {
        let passed = send(&app, "tok-mini", method.clone(), path, body.clone()).await;
        assert_eq!(passed.status(), 200, "{method} {path}");
        let sent = app.upstream.last_request().unwrap();
        assert_eq!(
            (sent.method.as_str(), sent.path.as_str()),
            (method.as_str(), path)
        );
        assert_eq!(sent.json().unwrap(), body, "{path}: forwarded unchanged");
    }
}

#[tokio::test]
async fn an_endpoint_that_generates_without_a_readable_model_is_refused_unless_listed() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let cases = [
        (
            Method::POST,
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        ),
        (
            Method::POST,
            "/v1/evals/eval_1/runs",
            json!({"name": "run", "data_source": {"type": "completions", "model": "gpt-4"}}),
        ),
        (
            Method::POST,
            "/v1/realtime/transcription_sessions",
            json!({"input_audio_transcription": {"model": "gpt-4o-transcribe"}}),
        ),
        // A named model does not make them checkable: the job's graders, the run's assistant
        // name models of their own.
        (
            Method::POST,
            "/v1/fine_tuning/jobs",
            json!({"model": "gpt-4o-mini", "training_file": "file-1"}),
        ),
        (
            Method::POST,
            "/v1/threads/thread_1/runs",
            json!({"assistant_id": "asst_1"}),
        ),
        (
            Method::POST,
            "/v1/vector_stores/vs_1/file_batches",
            json!({"file_ids": ["file-1"]}),
        ),
        (Method::PUT, "/v1/batches", json!({})),
        // A path the proxy does not know may generate.
        (
            Method::POST,
            "/v1/something/new",
            json!({"model": "gpt-4o-mini"}),
        ),
    ];
    for (method, path, body) in cases {
        let refused = send(&app, "tok-mini", method.clone(), path, body).await;
        assert_eq!(refused.status(), 403, "{method} {path}");
        assert_json_error(refused, 403, "endpoint_not_allowed", ENDPOINT_NOT_ALLOWED).await;
    }
    let call = post_call(&app, "tok-mini", "gpt-4o-mini").await;
    assert_json_error(call, 403, "endpoint_not_allowed", ENDPOINT_NOT_ALLOWED).await;
    // Another spelling of the path is the same endpoint.
    let spelled = send(&app, "tok-mini", Method::POST, "/v1//%62atches/", json!({})).await;
    assert_json_error(spelled, 403, "endpoint_not_allowed", ENDPOINT_NOT_ALLOWED).await;
    assert_eq!(app.upstream.requests_started(), 0, "nothing went upstream");
    assert!(metrics(&app).await.contains(
        "llm_proxy_limit_refusals_total{client=\"mini\",reason=\"endpoint_not_allowed\"} 10"
    ));

    // The client whose `endpoints` list has them gets through; the others stay refused.
    for path in ["/v1/batches", "/v1/evals/eval_1/runs"] {
        let allowed = send(&app, "tok-batcher", Method::POST, path, json!({})).await;
        assert_eq!(allowed.status(), 200, "{path}");
        assert_eq!(app.upstream.last_request().unwrap().path, path);
    }
    assert_eq!(
        post_call(&app, "tok-batcher", "gpt-realtime")
            .await
            .status(),
        200
    );
    assert_eq!(
        app.upstream.last_request().unwrap().path,
        "/v1/realtime/calls"
    );
    let refused = send(
        &app,
        "tok-batcher",
        Method::POST,
        "/v1/fine_tuning/jobs",
        json!({"model": "gpt-4o-mini"}),
    )
    .await;
    assert_json_error(refused, 403, "endpoint_not_allowed", ENDPOINT_NOT_ALLOWED).await;
    // `endpoints` opens the endpoint, not the models of the endpoints that name one.
    let chat = app.chat("tok-batcher", chat_body("gpt-4")).await;
    assert_json_error(chat, 403, "model_not_allowed", NOT_ALLOWED).await;
    assert_eq!(app.upstream.requests_started(), 3);
}

#[tokio::test]
async fn reading_storing_and_cancelling_pass_for_a_client_with_a_model_list() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let cases = [
        (Method::GET, "/v1/batches"),
        (Method::GET, "/v1/batches/batch_1"),
        (Method::POST, "/v1/batches/batch_1/cancel"),
        (Method::GET, "/v1/evals/eval_1/runs"),
        (Method::POST, "/v1/evals/eval_1/runs/run_1"),
        (
            Method::DELETE,
            "/v1/fine_tuning/checkpoints/ckpt_1/permissions/perm_1",
        ),
        (Method::GET, "/v1/fine_tuning/jobs"),
        (Method::HEAD, "/v1/vector_stores"),
        (Method::POST, "/v1/files"),
        (Method::DELETE, "/v1/files/file-1"),
        (Method::POST, "/v1/uploads/upload_1/complete"),
        (Method::POST, "/v1/threads/thread_1/messages"),
        (Method::POST, "/v1/conversations"),
        (Method::POST, "/v1/responses/resp_1/cancel"),
        (Method::POST, "/v1/chat/completions/chatcmpl_1"),
        (Method::POST, "/v1/realtime/calls/rtc_1/hangup"),
        (Method::GET, "/v1/realtime"),
        (Method::OPTIONS, "/v1/something/new"),
    ];
    for (method, path) in cases {
        let request = app.request_as("tok-mini", method.clone(), path);
        let request = match method {
            Method::POST => request.json(&json!({"metadata": {}})),
            _ => request,
        };
        let passed = request.send().await.unwrap();
        assert_eq!(passed.status(), 200, "{method} {path}");
        let sent = app.upstream.last_request().unwrap();
        assert_eq!(
            (sent.method.as_str(), sent.path.as_str()),
            (method.as_str(), path)
        );
    }
    assert_eq!(app.upstream.requests_started(), 18);
}

#[tokio::test]
async fn a_client_without_a_model_list_is_unaffected() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    for token in [CLIENT_TOKEN, "tok-counted"] {
        for (method, path, body) in [
            (Method::POST, "/v1/batches", json!({})),
            (Method::POST, "/v1/evals/eval_1/runs", json!({})),
            (Method::POST, "/v1/something/new", json!({})),
            (Method::PUT, "/v1/chat/completions", chat_body("gpt-4")),
            (
                Method::POST,
                "/v1/realtime/client_secrets",
                json!({"session": {"type": "realtime", "model": "gpt-realtime"}}),
            ),
        ] {
            let passed = send(&app, token, method.clone(), path, body).await;
            assert_eq!(passed.status(), 200, "{token} {method} {path}");
        }
        assert_eq!(post_call(&app, token, "gpt-realtime").await.status(), 200);
    }
    assert_eq!(app.upstream.requests_started(), 12);
}

#[tokio::test]
async fn admin_clients_shows_the_endpoints_a_client_may_call() {
    let (app, _) = spawn_with_clients(CLIENTS).await;
    let listed: Value = app.admin_get("/admin/clients").await.json().await.unwrap();
    let limits = |name: &str| {
        listed["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|client| client["name"] == name)
            .unwrap()["limits"]
            .clone()
    };
    assert_eq!(
        limits("batcher")["endpoints"],
        json!(["/v1/batches*", "/v1/evals/*", "/v1/realtime/calls"])
    );
    assert_eq!(limits("mini").get("endpoints"), None);
}
