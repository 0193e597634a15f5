//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded as is.

use std::convert::Infallible;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use super::{auth, raw_query, with_state};
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
    let upstream_body = upstream::has_body(&headers).then(|| upstream::request_body(&state, body));
    let upstream_headers = upstream::request_headers(&state, &headers);
    Ok(
        match upstream::send(
            &state,
            method,
            path.as_str(),
            query.as_deref(),
            upstream_headers,
            upstream_body,
        )
        .await
        {
            Ok(response) => upstream::into_reply(&state, response),
            Err(error) => error.into_response(),
        },
    )
}
