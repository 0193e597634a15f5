//! Operator endpoints for orchestrators and scrapers: liveness, readiness, metrics.

use serde_json::json;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::{Filter, Rejection, Reply};

use super::with_state;
use crate::auth::presented_token;
use crate::error::ProxyError;
use crate::metrics;
use crate::state::AppState;

/// GET /healthz: 200 while the process serves, no token needed.
pub fn healthz() -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response())
}

/// GET /readyz: 200 while taking traffic, 503 once shutdown has begun.
pub fn readyz(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: AppState| {
            let (status, word) = if state.is_draining() {
                (StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else {
                (StatusCode::OK, "ready")
            };
            warp::reply::with_status(warp::reply::json(&json!({"status": word})), status)
                .into_response()
        })
}

/// GET /metrics: Prometheus text format. Needs `METRICS_TOKEN` when set, else `ADMIN_TOKEN` when
/// set, in `Authorization` (Bearer or bare, as Prometheus' `authorization` setting sends it);
/// open when neither is set.
pub fn metrics(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(with_state(state))
        .map(|headers: HeaderMap, state: AppState| {
            if let Some(tokens) = &state.metrics_tokens {
                let allowed = headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|value| tokens.contains(presented_token(value)));
                if !allowed {
                    return ProxyError::Unauthorized.into_response();
                }
            }
            let mut reply = warp::reply::Response::new(state.metrics.encode().into());
            reply.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            reply
        })
}
