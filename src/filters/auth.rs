//! Caller and admin token checks, applied after a route's path has matched.

use warp::http::HeaderMap;
use warp::{Filter, Rejection};

use super::with_state;
use crate::auth::{TokenSet, presented_token};
use crate::error::ProxyError;
use crate::state::AppState;

/// Passes the request headers on when the caller may use the API: always when `AUTH_VALIDATION`
/// is off, otherwise only with a token from `ALLOWED_TOKENS`.
pub fn caller(state: AppState) -> impl Filter<Extract = (HeaderMap,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(with_state(state))
        .and_then(|headers: HeaderMap, state: AppState| async move {
            if !state.config.auth_validation || holds_token(&state, &headers, &state.client_tokens)
            {
                Ok(headers)
            } else {
                Err(warp::reject::custom(ProxyError::Unauthorized))
            }
        })
}

/// Without `ADMIN_TOKEN` configured the admin routes do not exist: 404, whatever the method.
pub fn admin_enabled(state: AppState) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::any()
        .and(with_state(state))
        .and_then(|state: AppState| async move {
            match state.admin_tokens {
                Some(_) => Ok(()),
                None => Err(warp::reject::not_found()),
            }
        })
        .untuple_one()
}

/// Lets the request through only with `ADMIN_TOKEN`, whatever `AUTH_VALIDATION` says: a client
/// token is not enough.
pub fn admin(state: AppState) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(with_state(state))
        .and_then(|headers: HeaderMap, state: AppState| async move {
            match &state.admin_tokens {
                Some(tokens) if holds_token(&state, &headers, tokens) => Ok(()),
                _ => Err(warp::reject::custom(ProxyError::Unauthorized)),
            }
        })
        .untuple_one()
}

fn holds_token(state: &AppState, headers: &HeaderMap, tokens: &TokenSet) -> bool {
    let held = headers
        .get(&state.config.auth_header)
        .is_some_and(|value| tokens.contains(presented_token(value)));
    if !held {
        // Never the token itself: only which header was looked at.
        log::debug!(
            "rejected a request without a valid token in {}",
            state.config.auth_header
        );
    }
    held
}
