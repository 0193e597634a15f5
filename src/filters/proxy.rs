//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded as is.

use std::convert::Infallible;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use super::{auth, raw_query, with_state};
use crate::error::ProxyError;
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
    // Errors are answered here rather than rejected, so warp never tries another route.
    Ok(
        match call_upstream(headers, method, &path, query.as_deref(), body, &state).await {
            Ok(response) => upstream::into_reply(&state, response).await,
            Err(error) => error.into_response(),
        },
    )
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
    let url = upstream::upstream_url(&state.config.target_host, path.as_str(), query)?;
    // A declared length over the limit is refused before the upstream hears of the request.
    let max_body = state.config.limits.max_body_bytes;
    if upstream::declared_length(&headers).is_some_and(|length| length > max_body) {
        return Err(ProxyError::PayloadTooLarge);
    }
    let body = upstream::has_body(&headers).then(|| upstream::request_body(state, body));
    let headers = upstream::request_headers(
        &headers,
        &state.config.auth_header,
        &state.upstream_authorization,
    );
    upstream::send(state, method, url, headers, body).await
}
