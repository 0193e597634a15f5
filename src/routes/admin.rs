//! Operator actions, behind `ADMIN_TOKEN`.

use serde_json::json;
use warp::{Filter, Rejection, Reply};

use super::{Route, allow, with};
use crate::auth::filters::{admin, admin_enabled};
use crate::error::rfc3339_now;
use crate::proxy::models_cache::ModelsCache;
use crate::state::AppState;

/// POST /admin/cache/clear
pub fn clear_cache(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path!("admin" / "cache" / "clear")
        .and(admin_enabled(state.auth.clone()))
        .and(allow(Route::Admin))
        .and(admin(state.auth.clone()))
        .and(with(state.models.clone()))
        .map(|models: ModelsCache| {
            models.clear();
            log::info!("models cache cleared by admin request");
            warp::reply::json(&json!({
                "message": "models cache cleared",
                "time": rfc3339_now(),
            }))
            .into_response()
        })
}
