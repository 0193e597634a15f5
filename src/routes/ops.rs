//! Operator endpoints for orchestrators and scrapers: liveness, readiness, metrics.

use serde_json::json;
use warp::http::{HeaderValue, header};
use warp::{Rejection, Reply};

use super::{Request, allow};
use crate::error::Readiness;
use crate::ops::metrics;
use crate::proxy::breaker::BreakerState;
use crate::state::AppState;

/// GET /healthz: 200 while the process serves, no token needed.
pub fn healthz<S>(request: &Request<S>) -> Result<warp::reply::Response, Rejection> {
    allow(request)?;
    Ok(warp::reply::json(&json!({"status": "ok"})).into_response())
}

/// GET /readyz: 200 while taking traffic, 503 once shutdown has begun, while every key is
/// disabled (refused, its probe too; a key resting after a 429 still counts: it comes back by
/// itself), or while every upstream with a key has its breaker open. The body says
/// where the shared state is kept, `"limits":"shared"` or `"local"`: Redis being down does not
/// make a replica unready, it still serves with local state.
pub fn readyz<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    allow(request)?;
    let table = state.router.table();
    let upstreams = table.upstreams();
    let keyed = upstreams
        .iter()
        .any(|upstream| upstream.keys().any_enabled());
    let healthy = upstreams.iter().any(|upstream| {
        upstream.keys().any_enabled() && upstream.breaker().state() != BreakerState::Open
    });
    let readiness = if state.is_draining() {
        Readiness::Draining
    } else if !keyed {
        Readiness::NoUpstreamKey
    } else if !healthy {
        Readiness::NoHealthyUpstream
    } else {
        Readiness::Ready
    };
    // Only with an upstreams file: the body without one stays as it always was.
    let breakers = state.config.upstreams.file.is_some().then(|| {
        upstreams
            .iter()
            .map(|upstream| {
                (
                    upstream.name().to_string(),
                    super::admin::breaker_word(upstream.breaker().state()),
                )
            })
            .collect()
    });
    Ok(readiness.into_response(state.shared.mode().as_str(), breakers))
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
    state.router.table().publish_state();
    let mut reply = warp::reply::Response::new(state.metrics.encode().into());
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(reply)
}
