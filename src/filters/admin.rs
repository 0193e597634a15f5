//! Operator endpoints.

use serde_json::json;
use warp::{Filter, Rejection, Reply};

use super::{auth, with_state};
use crate::error::rfc3339_now;
use crate::state::AppState;

/// POST /admin/cache/clear
pub fn clear_cache(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("admin" / "cache" / "clear")
        .and(auth::admin_enabled(state.clone()))
        .and(warp::post())
        .and(auth::admin(state.clone()))
        .and(with_state(state))
        .map(|state: AppState| {
            state.models.clear();
            log::info!("models cache cleared by admin request");
            warp::reply::json(&json!({
                "message": "models cache cleared",
                "time": rfc3339_now(),
            }))
            .into_response()
        })
}
