//! Caller and admin token checks, applied after a route's path has matched.

use std::sync::Arc;

use warp::http::HeaderMap;
use warp::{Filter, Rejection};

use super::with_state;
use crate::auth::{TokenSet, presented_token};
use crate::error::ProxyError;
use crate::exchange::ANONYMOUS;
use crate::state::AppState;

/// Who is calling: the label used in metrics and the access log, never the token itself.
#[derive(Clone, Debug)]
pub struct Caller {
    pub label: Arc<str>,
}

/// Passes the request headers and the caller on when the caller may use the API: always when
/// `AUTH_VALIDATION` is off, otherwise only with a token from `ALLOWED_TOKENS`.
pub fn caller(
    state: AppState,
) -> impl Filter<Extract = (HeaderMap, Caller), Error = Rejection> + Clone {
    let anonymous: Arc<str> = Arc::from(ANONYMOUS);
    warp::header::headers_cloned()
        .and(with_state(state))
        .and_then(move |headers: HeaderMap, state: AppState| {
            let anonymous = anonymous.clone();
            async move {
                if !state.config.auth_validation {
                    return Ok((headers, Caller { label: anonymous }));
                }
                let position = headers
                    .get(&state.config.auth_header)
                    .and_then(|value| state.client_tokens.position(presented_token(value)));
                match position {
                    Some(index) => {
                        let label = state.client_labels[index].clone();
                        Ok((headers, Caller { label }))
                    }
                    None => {
                        log_rejection(&state);
                        Err(warp::reject::custom(ProxyError::Unauthorized))
                    }
                }
            }
        })
        .untuple_one()
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
        log_rejection(state);
    }
    held
}

fn log_rejection(state: &AppState) {
    // Never the token itself: only which header was looked at.
    log::debug!(
        "rejected a request without a valid token in {}",
        state.config.auth_header
    );
}
