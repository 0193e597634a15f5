//! Operator actions, behind `ADMIN_TOKEN`.

use serde_json::json;
use warp::{Rejection, Reply};

use super::{Request, allow};
use crate::config::ClientLimits;
use crate::error::rfc3339_now;
use crate::state::AppState;

/// POST /admin/cache/clear
pub fn clear_cache<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(request, state)?;
    state.models.clear();
    log::info!("models cache cleared by admin request");
    Ok(warp::reply::json(&json!({
        "message": "models cache cleared",
        "time": rfc3339_now(),
    }))
    .into_response())
}

/// GET /admin/clients: every client's limits (the clients file's field names) and usage; never a
/// token.
pub async fn clients<S>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(&request, &state)?;
    let mut listed = Vec::new();
    for client in state.auth.clients() {
        let usage = state.policy.limiter().usage(&client.name).await;
        listed.push(json!({
            "name": &*client.name,
            "limits": limits_json(&client.limits),
            "usage": usage,
        }));
    }
    Ok(warp::reply::json(&json!({ "clients": listed })).into_response())
}

/// Without `ADMIN_TOKEN` configured the admin routes do not exist: 404, whatever the method.
/// Then the method (405), then the token.
fn admitted<S>(request: &Request<S>, state: &AppState) -> Result<(), Rejection> {
    if !state.auth.admin_enabled() {
        return Err(warp::reject::not_found());
    }
    allow(request)?;
    state
        .auth
        .check_admin(&request.headers)
        .map_err(warp::reject::custom)
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
