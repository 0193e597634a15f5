//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded as is.

use std::convert::Infallible;
use std::time::Instant;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use super::{raw_query, reports_usage, with};
use crate::auth::Caller;
use crate::auth::filters::caller;
use crate::ops::exchange::Exchange;
use crate::proxy::Upstream;
use crate::proxy::response::Forwarded;
use crate::proxy::upgrade::is_websocket_upgrade;

/// ANY /v1/... (POST /v1/chat/completions among them)
pub fn forward(
    state: crate::state::AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path("v1")
        .and(caller(state.auth.clone()))
        .and(warp::method())
        .and(warp::path::full())
        .and(raw_query())
        .and(warp::body::stream())
        .and(with(state.upstream.clone()))
        .and_then(forward_request)
}

async fn forward_request<S, B>(
    headers: HeaderMap,
    caller: Caller,
    method: Method,
    path: FullPath,
    query: Option<String>,
    body: S,
    upstream: Upstream,
) -> Result<warp::reply::Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let asked = Instant::now();
    let forwarded = if is_websocket_upgrade(&method, &headers) {
        upstream
            .open_tunnel(headers, path.as_str(), query.as_deref())
            .await
    } else {
        match upstream
            .forward(headers, method, path.as_str(), query.as_deref(), body)
            .await
        {
            Ok(answer) => {
                let usage = reports_usage(path.as_str()).then(|| caller.label.clone());
                Ok(upstream.into_reply(answer, usage).await)
            }
            Err(error) => Err(error),
        }
    };
    let upstream_wait = asked.elapsed();
    // Errors are answered here rather than rejected, so warp never tries another route.
    let Forwarded {
        mut response,
        stream,
    } = forwarded.unwrap_or_else(|error| Forwarded {
        response: error.into_response(),
        stream: false,
    });
    response.extensions_mut().insert(Exchange {
        client: caller.label,
        upstream_wait: Some(upstream_wait),
        stream,
    });
    Ok(response)
}
