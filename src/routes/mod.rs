//! The warp route table. Each route family lives in its own file; this module composes them with
//! `.or()` and attaches the one `recover`. Routes are told apart by the request's [`Endpoint`]
//! (classified once, by the server), not by path literals of their own.

mod admin;
mod models;
mod ops;
mod proxy;

use std::convert::Infallible;

use warp::http::Method;
use warp::{Filter, Rejection};

use crate::error::{ProxyError, handle_rejection};
use crate::state::AppState;
use crate::vocab::endpoint::Shape;
use crate::vocab::{Endpoint, Route, classify};

/// Every route the proxy serves, with errors already turned into JSON responses.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let format = state.config.error_format;
    // The `/v1` routes first: nearly every request is one, and each route tried before the one
    // that takes it costs a filter chain. The model list comes before the forward, which would
    // take `GET /v1/models` too.
    models::list(state.clone())
        .or(proxy::forward(state.clone()))
        .unify()
        .or(ops::healthz())
        .unify()
        .or(ops::readyz(state.clone()))
        .unify()
        .or(ops::metrics(state.clone()))
        .unify()
        .or(admin::clear_cache(state.clone()))
        .unify()
        .or(admin::clients(state.clone()))
        .unify()
        .or(admin::upstreams(state))
        .unify()
        .recover(move |rejection| handle_rejection(rejection, format))
        .unify()
}

/// Hands each request a clone of a shared handle (cloning is shallow).
fn with<T: Clone + Send>(handle: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || handle.clone())
}

/// The request's classification: the one the server made, or (for a request handed to the route
/// table directly, as `warp::test` does) made here the same way.
fn endpoint() -> impl Filter<Extract = (Endpoint,), Error = Infallible> + Clone {
    warp::ext::get::<Endpoint>()
        .or(warp::method()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .map(|method, path: warp::path::FullPath, headers| {
                classify(&method, path.as_str(), Shape::of(&method, &headers))
            }))
        .unify()
}

/// Lets only requests classified as `route` through; the others go on to the next route, and
/// end as 404 when none takes them.
fn route(route: Route) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    endpoint()
        .and_then(move |endpoint: Endpoint| async move {
            if endpoint.route == route {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
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
