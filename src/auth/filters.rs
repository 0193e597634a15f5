//! The token checks as warp filters, applied after a route's path has matched so that unknown
//! paths stay 404s.

use warp::http::HeaderMap;
use warp::{Filter, Rejection};

use super::{Authenticator, Caller};
use crate::error::ProxyError;

/// Passes the request headers and the caller on when the caller may use the API.
pub fn caller(
    auth: Authenticator,
) -> impl Filter<Extract = (HeaderMap, Caller), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |headers: HeaderMap| {
            let checked = auth.caller(&headers);
            async move {
                match checked {
                    Ok(caller) => Ok((headers, caller)),
                    Err(error) => Err(warp::reject::custom(error)),
                }
            }
        })
        .untuple_one()
}

/// Without `ADMIN_TOKEN` configured the admin routes do not exist: 404, whatever the method.
pub fn admin_enabled(auth: Authenticator) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and_then(move || {
            let enabled = auth.admin_enabled();
            async move {
                if enabled {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            }
        })
        .untuple_one()
}

/// Lets the request through only with `ADMIN_TOKEN`.
pub fn admin(auth: Authenticator) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    passes(auth, Authenticator::check_admin)
}

/// Lets a metrics scrape through when it holds the metrics token, or when none is configured.
pub fn scraper(auth: Authenticator) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    passes(auth, Authenticator::check_scraper)
}

type Check = fn(&Authenticator, &HeaderMap) -> Result<(), ProxyError>;

fn passes(
    auth: Authenticator,
    check: Check,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |headers: HeaderMap| {
            let checked = check(&auth, &headers);
            async move { checked.map_err(warp::reject::custom) }
        })
        .untuple_one()
}
