//! The warp route table. One filter takes what any route needs of the request and reads its
//! [`Endpoint`] (classified once, by the server); a `match` on the endpoint's route hands it to
//! the family's handler, each family in its own file, and the one `recover` answers the errors.
//!
//! One dispatch rather than a filter per family tried in turn with `.or()`: every family tried
//! before the one that takes a request cost a filter chain and a rejection, on every request.

mod admin;
mod models;
mod ops;
mod page;
mod proxy;

use std::convert::Infallible;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use crate::error::{ProxyError, handle_rejection};
use crate::state::AppState;
use crate::vocab::endpoint::{Shape, Target};
use crate::vocab::{Endpoint, Route, classify};

/// Every route the proxy serves, with errors already turned into JSON responses.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let format = state.config.error_format;
    // Each filter joined with `.and()` moves everything extracted before it once more: the small
    // extractions come first, and the state comes with the handler's closure, not in a filter.
    warp::method()
        .and(warp::path::full())
        .and(target())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(move |method, path, endpoint, query, headers, body| {
            dispatch(method, path, endpoint, query, headers, body, state.clone())
        })
        .recover(move |rejection| handle_rejection(rejection, format))
        .unify()
}

/// What a route's handler may read of the request.
struct Request<S> {
    endpoint: Endpoint,
    method: Method,
    path: FullPath,
    query: Option<String>,
    headers: HeaderMap,
    body: S,
}

/// The route table: each route to its family's handler. A route none takes (an unknown path,
/// an `/admin/...` path that is no action) is a 404.
async fn dispatch<S, B>(
    method: Method,
    path: FullPath,
    endpoint: Endpoint,
    query: Option<String>,
    headers: HeaderMap,
    body: S,
    state: AppState,
) -> Result<warp::reply::Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let request = Request {
        endpoint,
        method,
        path,
        query,
        headers,
        body,
    };
    match request.endpoint.route {
        // With a query string, or another method, the list is not cached: it is forwarded.
        Route::Models if models::is_cached(&request) => {
            // Boxed: a rare, cold future kept out of the size of every request's future.
            Box::pin(models::list(request, state)).await
        }
        // Boxed too, for the opposite reason: the forward's future is the largest by far, and
        // warp and hyper move the request's future a few times before it first runs; boxed, each
        // move copies a pointer instead of the whole forward.
        Route::Chat | Route::Models | Route::Passthrough => {
            Box::pin(proxy::forward(request, state)).await
        }
        Route::Healthz => ops::healthz(&request),
        Route::Readyz => ops::readyz(&request, &state),
        Route::Metrics => ops::metrics(&request, &state),
        Route::CacheClear => admin::clear_cache(&request, &state),
        Route::AdminClients => Box::pin(admin::clients(request, state)).await,
        Route::AdminUpstreams => admin::upstreams(&request, &state),
        Route::AdminSpend => Box::pin(admin::spend(request, state)).await,
        Route::AdminActivity => Box::pin(admin::activity(request, state)).await,
        Route::AdminPage | Route::AdminAsset => page::serve(&request, &state),
        Route::Admin | Route::Other => Err(warp::reject::not_found()),
    }
}

/// The request's classification and query: the ones the server took, or (for a request handed
/// to the route table directly, as `warp::test` does) taken here the same way.
fn target() -> impl Filter<Extract = (Endpoint, Option<String>), Error = Infallible> + Clone {
    warp::ext::get::<Target>()
        .map(|target: Target| (target.endpoint, target.query))
        .untuple_one()
        .or(warp::method()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(raw_query())
            .map(|method, path: warp::path::FullPath, headers, query| {
                let shape = Shape::of(&method, &headers);
                (classify(&method, path.as_str(), shape), query)
            })
            .untuple_one())
        .unify()
}

/// Lets only the method the request's route takes through; any other is answered 405 with that
/// route's own `Allow`, after the path matched so that unknown paths stay 404s.
fn allow<S>(request: &Request<S>) -> Result<(), Rejection> {
    let route = request.endpoint.route;
    if route.accepts(&request.method) {
        Ok(())
    } else {
        Err(warp::reject::custom(ProxyError::MethodNotAllowed {
            allow: route.allow().unwrap_or(""),
        }))
    }
}

/// The raw query string, if the request has one.
fn raw_query() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify()
}
