//! The warp route table. Each route family lives in its own file; this module composes them with
//! `.or()` and attaches the one `recover`.

mod admin;
mod models;
mod ops;
mod proxy;
mod route;

use std::convert::Infallible;

use warp::http::Method;
use warp::{Filter, Rejection};

use crate::error::{ProxyError, handle_rejection};
use crate::state::AppState;
pub use route::{Route, reports_usage};

/// Every route the proxy serves, with errors already turned into JSON responses.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let format = state.config.error_format;
    ops::healthz()
        .or(ops::readyz(state.clone()))
        .unify()
        .or(ops::metrics(state.clone()))
        .unify()
        .or(admin::clear_cache(state.clone()))
        .unify()
        .or(admin::clients(state.clone()))
        .unify()
        .or(models::list(state.clone()))
        .unify()
        .or(proxy::forward(state))
        .unify()
        .recover(move |rejection| handle_rejection(rejection, format))
        .unify()
}

/// Hands each request a clone of a shared handle (cloning is shallow).
fn with<T: Clone + Send>(handle: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || handle.clone())
}

/// Lets only the method `route` takes through; any other is answered 405 with that route's own
/// `Allow`, after the path matched so that unknown paths stay 404s.
fn allow(route: Route) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and_then(move |method: Method| async move {
            if route.accepts(&method) {
                Ok(())
            } else {
                Err(warp::reject::custom(ProxyError::MethodNotAllowed {
                    allow: route.allow().unwrap_or(""),
                }))
            }
        })
        .untuple_one()
}

/// The raw query string, if the request has one.
fn raw_query() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}
