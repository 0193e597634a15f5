//! The cached model list.

use std::time::Instant;

use serde_json::json;
use warp::http::{HeaderValue, Method, header};
use warp::{Rejection, Reply};

use super::Request;
use crate::error::{ErrorFormat, ProxyError};
use crate::ops::exchange::Exchange;
use crate::proxy::models_cache::{CacheStatus, CachedResponse};
use crate::proxy::router::Table;
use crate::state::AppState;

const CACHE_STATUS_HEADER: &str = "x-proxy-cache";

/// Whether a request for the model list is answered from the cache: a `GET` without a query
/// string. Any other goes through the generic proxy.
pub fn is_cached<S>(request: &Request<S>) -> bool {
    request.method == Method::GET && request.query.is_none()
}

/// GET /v1/models
pub async fn list<S>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection> {
    let caller = state
        .auth
        .caller(&request.headers)
        .map_err(warp::reject::custom)?;
    let table = state.router.table();
    let asked = Instant::now();
    let models = caller
        .client
        .as_ref()
        .and_then(|client| client.limits.models.is_some().then_some(&client.limits));
    let (mut reply, cache_status) = if table.by_model() {
        let (entries, cache_status) = table.merged_models().await;
        let entries = entries
            .into_iter()
            .filter(|entry| {
                models.is_none_or(|limits| {
                    entry
                        .get("id")
                        .and_then(|id| id.as_str())
                        .is_some_and(|id| limits.allows_model(id))
                })
            })
            .collect::<Vec<_>>();
        let mut reply =
            warp::reply::json(&json!({"object": "list", "data": entries})).into_response();
        reply.headers_mut().insert(
            CACHE_STATUS_HEADER,
            HeaderValue::from_static(cache_status.as_str()),
        );
        (reply, cache_status)
    } else {
        let upstream = table.default_upstream().clone();
        let fetching = upstream.clone();
        let (result, cache_status) = upstream
            .models_cache()
            .get_or_fetch(move || fetching.fetch_models())
            .await;
        // Errors are answered here rather than rejected: a rejection would make warp try the
        // next route and send the request upstream a second time.
        let reply = match result {
            Ok(cached) => match models {
                Some(limits) if cached.status.is_success() => {
                    filtered_reply(&cached, cache_status, |id| limits.allows_model(id))
                }
                _ => cached_reply(&cached, cache_status),
            },
            Err(error) => error.into_response(state.config.error_format),
        };
        (reply, cache_status)
    };
    let upstream_wait = match cache_status {
        CacheStatus::Hit => {
            state.metrics.cache_hit();
            None
        }
        CacheStatus::Miss => {
            state.metrics.cache_miss();
            Some(asked.elapsed())
        }
    };
    reply.extensions_mut().insert(Exchange {
        client: caller.label,
        upstream_wait,
        stream: false,
        way: None,
    });
    Ok(reply)
}

/// `GET /v1/models/{id}` with an upstreams file: the merged list's entry, or 404
/// `model_not_found` (the model list and the routing agree on what exists).
pub async fn model_entry(table: &Table, id: &str, format: ErrorFormat) -> warp::reply::Response {
    let (entries, _) = table.merged_models().await;
    match entries
        .into_iter()
        .find(|entry| entry.get("id").and_then(|found| found.as_str()) == Some(id))
    {
        Some(entry) => warp::reply::json(&entry).into_response(),
        None => ProxyError::ModelNotFound.into_response(format),
    }
}

/// The shared list with only the models `allowed` keeps: one cache for everybody, filtered per
/// caller. A body that is not the usual `{"data":[...]}` is passed on as it is.
fn filtered_reply(
    cached: &CachedResponse,
    cache_status: CacheStatus,
    allowed: impl Fn(&str) -> bool,
) -> warp::reply::Response {
    let mut list: serde_json::Value = match serde_json::from_slice(&cached.body) {
        Ok(list) => list,
        Err(_) => return cached_reply(cached, cache_status),
    };
    let Some(data) = list.get_mut("data").and_then(|data| data.as_array_mut()) else {
        return cached_reply(cached, cache_status);
    };
    data.retain(|model| {
        model
            .get("id")
            .and_then(|id| id.as_str())
            .is_some_and(&allowed)
    });
    let mut reply = cached_reply(cached, cache_status);
    reply.headers_mut().remove(header::CONTENT_LENGTH);
    *reply.body_mut() = serde_json::to_vec(&list).unwrap_or_default().into();
    reply
}

fn cached_reply(cached: &CachedResponse, cache_status: CacheStatus) -> warp::reply::Response {
    let mut reply = warp::reply::Response::new(cached.body.clone().into());
    *reply.status_mut() = cached.status;
    *reply.headers_mut() = cached.headers.clone();
    reply.headers_mut().insert(
        CACHE_STATUS_HEADER,
        HeaderValue::from_static(cache_status.as_str()),
    );
    reply
}
