//! The cached model list.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use warp::http::{HeaderValue, Method, header};
use warp::{Filter, Rejection};

use super::auth::{self, Caller};
use super::{raw_query, with_state};
use crate::exchange::Exchange;
use crate::models_cache::{CacheStatus, CachedResponse, FetchResult};
use crate::state::AppState;
use crate::streams::mask_secret;
use crate::upstream;

const CACHE_STATUS_HEADER: &str = "x-proxy-cache";

/// GET /v1/models (with a query string it is not cached and goes through the generic proxy)
pub fn list(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("v1" / "models")
        .and(warp::get())
        .and(raw_query())
        .and_then(|query: Option<String>| async move {
            match query {
                None => Ok(()),
                Some(_) => Err(warp::reject::not_found()),
            }
        })
        .untuple_one()
        .and(auth::caller(state.clone()))
        .and(with_state(state))
        .and_then(list_models)
}

async fn list_models(
    _caller_headers: warp::http::HeaderMap,
    caller: Caller,
    state: AppState,
) -> Result<warp::reply::Response, Infallible> {
    let fetch_state = state.clone();
    let asked = Instant::now();
    let (result, cache_status) = state
        .models
        .get_or_fetch(move || fetch_models(fetch_state))
        .await;
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
    // Errors are answered here rather than rejected: a rejection would make warp try the next
    // route and send the request upstream a second time.
    let mut reply = match result {
        Ok(cached) => cached_reply(&cached, cache_status),
        Err(error) => error.into_response(),
    };
    reply.extensions_mut().insert(Exchange {
        client: caller.label,
        upstream_wait,
        stream: false,
    });
    Ok(reply)
}

/// One upstream fetch shared by every waiting caller, so it carries no caller's headers: only the
/// upstream key. In particular no `Accept-Encoding`, or one caller's gzip would be served to all.
async fn fetch_models(state: AppState) -> FetchResult {
    state.metrics.cache_fetch();
    let mut headers = warp::http::HeaderMap::with_capacity(2);
    headers.insert(header::AUTHORIZATION, state.upstream_authorization.clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let url = upstream::upstream_url(&state.target_url, "/v1/models", None)?;
    let mut response = upstream::send(&state, Method::GET, url, headers, None).await?;
    let status = response.status();
    let mut headers =
        upstream::response_headers(std::mem::take(response.headers_mut()), state.key_to_mask());
    // Cookies are per caller; a shared answer must not hand one out to everybody.
    headers.remove(header::SET_COOKIE);
    let mut body = response.bytes().await.map_err(|err| {
        log::error!(
            "reading the upstream model list failed: {}",
            upstream::error_chain(&err)
        );
        crate::error::ProxyError::BadGateway
    })?;
    if !status.is_success()
        && let Some(masked) = mask_secret(&body, state.key_to_mask())
    {
        headers.remove(header::CONTENT_LENGTH);
        body = masked.freeze();
    }
    Ok(Arc::new(CachedResponse {
        status,
        headers,
        body,
    }))
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
