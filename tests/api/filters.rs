//! The route table alone, through `warp::test`: no listener needed for what never goes upstream.

use llm_proxy::AppState;

use crate::helpers::*;

fn routes(
    extra: &[(&str, &str)],
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone
{
    let mut vars = vec![
        ("TARGET_HOST", "http://127.0.0.1:9"),
        ("AUTH_BEARER", UPSTREAM_KEY),
        ("AUTH_VALIDATION", "true"),
        ("ALLOWED_TOKENS", CLIENT_TOKEN),
    ];
    vars.extend_from_slice(extra);
    llm_proxy::routes(AppState::new(config_from(&vars)))
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("JSON body")
}

#[tokio::test]
async fn missing_token_is_rejected_before_any_upstream_call() {
    let response = warp::test::request()
        .method("POST")
        .path("/v1/chat/completions")
        .body("{}")
        .reply(&routes(&[]))
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body = json(response.body());
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["message"], "Invalid or missing authorization token");
    assert_rfc3339(body["time"].as_str().unwrap());
}

#[tokio::test]
async fn unmatched_paths_are_404_json() {
    for path in [
        "/",
        "/v2/chat/completions",
        // `/admin` itself is sent to the status page (308): see status_page.rs.
        "/admin/nothing",
        "/admin/cache/clear/extra",
    ] {
        let response = warp::test::request()
            .path(path)
            .header("authorization", CLIENT_TOKEN)
            .reply(&routes(&[("ADMIN_TOKEN", ADMIN_TOKEN)]))
            .await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(json(response.body())["error"], "not_found");
    }
}

#[tokio::test]
async fn admin_route_is_hidden_without_admin_token() {
    let response = warp::test::request()
        .method("POST")
        .path("/admin/cache/clear")
        .header("authorization", "Bearer whatever")
        .reply(&routes(&[]))
        .await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn upstream_down_is_a_502_json() {
    let response = warp::test::request()
        .method("POST")
        .path("/v1/chat/completions")
        .header("authorization", CLIENT_TOKEN)
        .body("{}")
        .reply(&routes(&[]))
        .await;
    assert_eq!(response.status(), 502);
    assert_eq!(json(response.body())["error"], "bad_gateway");
}
