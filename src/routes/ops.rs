//! Operator endpoints for orchestrators and scrapers: liveness, readiness, metrics.

use serde_json::json;
use warp::http::{HeaderValue, header};
use warp::{Rejection, Reply};

use super::{Request, allow};
use crate::error::Readiness;
use crate::ops::metrics;
use crate::state::AppState;

/// GET /healthz: 200 while the process serves, no token needed.
pub fn healthz<S>(request: &Request<S>) -> Result<warp::reply::Response, Rejection> {
    allow(request)?;
    Ok(warp::reply::json(&json!({"status": "ok"})).into_response())
}

/// GET /readyz: 200 while taking traffic, 503 once shutdown has begun or while every key is
/// disabled (refused, its probe too; a key resting after a 429 still counts: it comes back by
/// itself). The body says
/// where the shared state is kept, `"limits":"shared"` or `"local"`: Redis being down does not
/// make a replica unready, it still serves with local state.
pub fn readyz<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    allow(request)?;
    let readiness = if state.is_draining() {
        Readiness::Draining
    } else if !state.upstream.keys().any_enabled() {
        Readiness::NoUpstreamKey
    } else {
        Readiness::Ready
    };
    Ok(readiness.into_response(state.shared.mode().as_str()))
}

/// GET /metrics: Prometheus text format. Needs `METRICS_TOKEN` when set, else `ADMIN_TOKEN` when
/// set; open when neither is set.
pub fn metrics<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    allow(request)?;
    state
        .auth
        .check_scraper(&request.headers)
        .map_err(warp::reject::custom)?;
    state.upstream.keys().publish_state();
    let mut reply = warp::reply::Response::new(state.metrics.encode().into());
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(reply)
}
