//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded as is.

use std::convert::Infallible;
use std::time::Instant;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use super::auth::{self, Caller};
use super::{raw_query, with_state};
use crate::error::ProxyError;
use crate::exchange::Exchange;
use crate::state::AppState;
use crate::upstream;

/// ANY /v1/... (POST /v1/chat/completions among them)
pub fn forward(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path("v1")
        .and(auth::caller(state.clone()))
        .and(warp::method())
        .and(warp::path::full())
        .and(raw_query())
        .and(warp::body::stream())
        .and(with_state(state))
        .and_then(forward_request)
}

async fn forward_request<S, B>(
    headers: HeaderMap,
    caller: Caller,
    method: Method,
    path: FullPath,
    query: Option<String>,
    body: S,
    state: AppState,
) -> Result<warp::reply::Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let asked = Instant::now();
    let upstream = call_upstream(headers, method, &path, query.as_deref(), body, &state).await;
    let upstream_wait = asked.elapsed();
    // Errors are answered here rather than rejected, so warp never tries another route.
    let mut reply = match upstream {
        Ok(response) => {
            let usage = reports_usage(path.as_str()).then(|| caller.label.clone());
            upstream::into_reply(&state, response, usage).await
        }
        Err(error) => error.into_response(),
    };
    let stream = reply
        .headers()
        .get(warp::http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    reply.extensions_mut().insert(Exchange {
        client: caller.label,
        upstream_wait: Some(upstream_wait),
        stream,
    });
    Ok(reply)
}

/// The endpoints whose answers carry a `usage` object worth counting.
fn reports_usage(path: &str) -> bool {
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ]
    .iter()
    .any(|endpoint| {
        path.strip_prefix(endpoint)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

async fn call_upstream<S, B>(
    headers: HeaderMap,
    method: Method,
    path: &FullPath,
    query: Option<&str>,
    body: S,
    state: &AppState,
) -> Result<reqwest::Response, ProxyError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let url = upstream::upstream_url(&state.target_url, path.as_str(), query)?;
    // A declared length over the limit is refused before the upstream hears of the request.
    let max_body = state.config.limits.max_body_bytes;
    if upstream::declared_length(&headers).is_some_and(|length| length > max_body) {
        return Err(ProxyError::PayloadTooLarge);
    }
    let body = upstream::has_body(&headers).then(|| upstream::request_body(state, body));
    let headers = upstream::request_headers(
        headers,
        &state.config.auth_header,
        &state.upstream_authorization,
    );
    upstream::send(state, method, url, headers, body).await
}
