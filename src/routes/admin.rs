//! Operator actions, behind `ADMIN_TOKEN`.

use serde_json::json;
use warp::{Filter, Rejection, Reply};

use super::{allow, route, with};
use crate::auth::filters::{admin, admin_enabled};
use crate::config::ClientLimits;
use crate::error::rfc3339_now;
use crate::proxy::models_cache::ModelsCache;
use crate::state::AppState;
use crate::vocab::Route;

/// POST /admin/cache/clear
pub fn clear_cache(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    route(Route::CacheClear)
        .and(admin_enabled(state.auth.clone()))
        .and(allow(Route::CacheClear))
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

/// GET /admin/clients: every client's limits (the clients file's field names) and usage; never a
/// token.
pub fn clients(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    route(Route::AdminClients)
        .and(admin_enabled(state.auth.clone()))
        .and(allow(Route::AdminClients))
        .and(admin(state.auth.clone()))
        .and(with(state))
        .then(list_clients)
}

async fn list_clients(state: AppState) -> warp::reply::Response {
    let mut listed = Vec::new();
    for client in state.auth.clients() {
        let usage = state.policy.limiter().usage(&client.name).await;
        listed.push(json!({
            "name": &*client.name,
            "limits": limits_json(&client.limits),
            "usage": usage,
        }));
    }
    warp::reply::json(&json!({ "clients": listed })).into_response()
}

/// The limits as the file spells them; fields the client does not set are left out.
fn limits_json(limits: &ClientLimits) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    let mut put = |name: &str, value: Option<serde_json::Value>| {
        if let Some(value) = value {
            object.insert(name.to_string(), value);
        }
    };
    put(
        "requests_per_minute",
        limits.requests_per_minute.map(Into::into),
    );
    put(
        "tokens_per_minute",
        limits.tokens_per_minute.map(Into::into),
    );
    put(
        "max_concurrent_requests",
        limits.max_concurrent_requests.map(Into::into),
    );
    put("tokens_per_day", limits.tokens_per_day.map(Into::into));
    put("models", limits.models.clone().map(Into::into));
    put("endpoints", limits.endpoints.clone().map(Into::into));
    put(
        "expires_at",
        limits
            .expires_at
            .map(|at| humantime::format_rfc3339_seconds(at).to_string().into()),
    );
    put("disabled", Some(limits.disabled.into()));
    serde_json::Value::Object(object)
}
