use crate::helpers::*;

const UNAUTHORIZED: &str = "Invalid or missing authorization token";

#[tokio::test]
async fn token_is_accepted_with_and_without_bearer() {
    let app = spawn_app(&[]).await;
    for value in [
        format!("Bearer {CLIENT_TOKEN}"),
        CLIENT_TOKEN.to_string(),
        format!("bearer  {CLIENT_TOKEN} "),
    ] {
        let response = app
            .client
            .get(app.url("/v1/models"))
            .header("authorization", value.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "with {value:?}");
    }
}

#[tokio::test]
async fn rejected_caller_gets_the_exact_401_body() {
    let app = spawn_app(&[]).await;
    for token in [None, Some("Bearer wrong"), Some(""), Some("Bearer ")] {
        let mut request = app.client.post(app.url("/v1/chat/completions")).body("{}");
        if let Some(token) = token {
            request = request.header("authorization", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_json_error(response, 401, "unauthorized", UNAUTHORIZED).await;
    }
    assert!(
        app.upstream.requests().is_empty(),
        "nothing reaches the upstream"
    );
}

#[tokio::test]
async fn allowed_tokens_are_trimmed() {
    let app = spawn_app(&[("ALLOWED_TOKENS", " first ,  second,third ")]).await;
    for token in ["first", "second", "third"] {
        let response = app.chat(token, serde_json::json!({"model": "m"})).await;
        assert_eq!(response.status(), 200, "token {token}");
    }
    let response = app.chat(" first ", serde_json::json!({})).await;
    assert_eq!(
        response.status(),
        200,
        "surrounding spaces in the header are ignored too"
    );
    let response = app.chat("fourth", serde_json::json!({})).await;
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn custom_auth_header_carries_the_token_and_is_not_forwarded() {
    let app = spawn_app(&[("DEFAULT_AUTH_HEADER", "X-Api-Key")]).await;
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-api-key", CLIENT_TOKEN)
        .json(&serde_json::json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = app.upstream.last_request().unwrap();
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );

    let in_authorization = app.chat(CLIENT_TOKEN, serde_json::json!({})).await;
    assert_eq!(
        in_authorization.status(),
        401,
        "only the configured header counts"
    );
}

#[tokio::test]
async fn validation_off_lets_anyone_through_but_still_swaps_the_key() {
    let app = spawn_app(&[("AUTH_VALIDATION", "false")]).await;
    let response = app
        .chat("anything", serde_json::json!({"model": "m"}))
        .await;
    assert_eq!(response.status(), 200);
    let response = app.client.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 200, "no token at all is fine too");
    for seen in app.upstream.requests() {
        assert_eq!(
            seen.header_values("authorization"),
            [format!("Bearer {UPSTREAM_KEY}")]
        );
    }
}

#[tokio::test]
async fn unknown_paths_are_404_without_asking_for_a_token() {
    let app = spawn_app(&[]).await;
    let response = app
        .client
        .get(app.url("/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_json_error(response, 404, "not_found", "No such route").await;
}
