use crate::helpers::*;

#[tokio::test]
async fn admin_clear_needs_the_admin_token() {
    let app = spawn_app(&[]).await;
    let clear = |token: Option<&str>| {
        let mut request = app.client.post(app.url("/admin/cache/clear"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = clear(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["message"], "models cache cleared");
    assert_rfc3339(body["time"].as_str().unwrap());

    let bare = app
        .client
        .post(app.url("/admin/cache/clear"))
        .header("authorization", ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 200, "a bare admin token works too");

    for token in [None, Some(CLIENT_TOKEN), Some("nope")] {
        let response = clear(token).await.unwrap();
        assert_json_error(
            response,
            401,
            "unauthorized",
            "Invalid or missing authorization token",
        )
        .await;
    }
}

#[tokio::test]
async fn admin_token_is_required_even_with_validation_off() {
    let app = spawn_app(&[("AUTH_VALIDATION", "false")]).await;
    let response = app
        .client
        .post(app.url("/admin/cache/clear"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn admin_routes_do_not_exist_without_admin_token() {
    let app = spawn_app(&[("ADMIN_TOKEN", "")]).await;
    for method in [reqwest::Method::POST, reqwest::Method::GET] {
        let response = app
            .request_as("anything", method, "/admin/cache/clear")
            .send()
            .await
            .unwrap();
        assert_json_error(response, 404, "not_found", "No such route").await;
    }
}

#[tokio::test]
async fn admin_clear_makes_the_next_models_request_refetch() {
    let app = spawn_app(&[]).await;
    app.models().await.unwrap();
    app.models().await.unwrap();
    assert_eq!(app.upstream.models_fetches(), 1);
    let cleared = app
        .request_as(ADMIN_TOKEN, reqwest::Method::POST, "/admin/cache/clear")
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    let response = app.models().await.unwrap();
    assert_eq!(response.headers()["x-proxy-cache"], "MISS");
    assert_eq!(app.upstream.models_fetches(), 2);
}

#[tokio::test]
async fn every_405_names_the_methods_of_its_own_route() {
    let app = spawn_app(&[]).await;
    let cases = [
        (reqwest::Method::POST, "/healthz", "GET"),
        (reqwest::Method::DELETE, "/healthz", "GET"),
        (reqwest::Method::POST, "/readyz", "GET"),
        (reqwest::Method::PUT, "/readyz", "GET"),
        (reqwest::Method::POST, "/metrics", "GET"),
        (reqwest::Method::GET, "/admin/cache/clear", "POST"),
        (reqwest::Method::DELETE, "/admin/cache/clear", "POST"),
    ];
    for (method, path, allow) in cases {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert_json_error(
            response,
            405,
            "method_not_allowed",
            "This route does not accept that HTTP method",
        )
        .await;
    }
    assert!(
        app.upstream.requests().is_empty(),
        "a refused method never reaches the upstream"
    );
}
