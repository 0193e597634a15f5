//! The route table. Each route family lives in its own file; this module composes them and
//! attaches the one `recover`.

mod admin;
mod auth;
mod models;
mod ops;
mod proxy;

use std::convert::Infallible;

use warp::Filter;

use crate::error::handle_rejection;
use crate::state::AppState;

/// Every route the proxy serves, with errors already turned into JSON responses.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    ops::healthz()
        .or(ops::readyz(state.clone()))
        .unify()
        .or(ops::metrics(state.clone()))
        .unify()
        .or(admin::clear_cache(state.clone()))
        .unify()
        .or(models::list(state.clone()))
        .unify()
        .or(proxy::forward(state))
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// Hands each request a clone of the shared state (cloning is shallow).
fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The raw query string, if the request has one.
fn raw_query() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}
