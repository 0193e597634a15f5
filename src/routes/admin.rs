//! Operator actions, behind `ADMIN_TOKEN`.

use serde_json::json;
use warp::{Rejection, Reply};

use super::{Request, allow};
use crate::config::ClientLimits;
use crate::error::{ProxyError, rfc3339_now};
use crate::policy::ledger::Group;
use crate::proxy::breaker::BreakerState;
use crate::state::AppState;
use crate::vocab::price::usd;

/// POST /admin/cache/clear
pub fn clear_cache<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(request, state)?;
    for upstream in state.router.table().upstreams() {
        upstream.models_cache().clear();
    }
    log::info!("models cache cleared by admin request");
    Ok(warp::reply::json(&json!({
        "message": "models cache cleared",
        "time": rfc3339_now(),
    }))
    .into_response())
}

/// GET /admin/clients: every client's limits (the clients file's field names), state, usage and
/// refusals of the last hour by reason; never a token.
pub async fn clients<S>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(&request, &state)?;
    let (_, mut hour) = state.activity.hour().await;
    let now = std::time::SystemTime::now();
    let mut listed = Vec::new();
    for client in state.auth.clients() {
        let usage = state.policy.limiter().usage(&client.name).await;
        let mut usage = serde_json::to_value(usage).unwrap_or_default();
        if let Some(usage) = usage.as_object_mut() {
            let refusals = hour.refusals.remove(&*client.name).unwrap_or_default();
            usage.insert("refusals_last_hour".to_string(), json!(refusals));
        }
        listed.push(json!({
            "name": &*client.name,
            "state": client_state(&client.limits, now),
            "limits": limits_json(&client.limits),
            "usage": usage,
        }));
    }
    Ok(no_store(
        warp::reply::json(&json!({ "clients": listed })).into_response(),
    ))
}

/// GET /admin/activity: the last hour minute by minute (requests, dollars, refusals), every
/// replica's in shared mode.
pub async fn activity<S>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(&request, &state)?;
    let (mode, hour) = state.activity.hour().await;
    let minutes: Vec<serde_json::Value> = hour
        .minutes
        .iter()
        .map(|(minute, counts)| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(minute * 60);
            json!({
                "minute": humantime::format_rfc3339_seconds(at).to_string(),
                "requests": counts.requests,
                "usd": counts.nanos as f64 / 1e9,
                "refusals": counts.refusals,
            })
        })
        .collect();
    Ok(no_store(
        warp::reply::json(&json!({ "mode": mode.as_str(), "minutes": minutes })).into_response(),
    ))
}

/// `disabled`, `expired` (at or past `expires_at`, refused like an unknown token) or `active`.
fn client_state(limits: &ClientLimits, now: std::time::SystemTime) -> &'static str {
    if limits.disabled {
        "disabled"
    } else if limits.expires_at.is_some_and(|expiry| now >= expiry) {
        "expired"
    } else {
        "active"
    }
}

/// What the admin JSON says changes from one moment to the next: never kept by a cache.
fn no_store(mut reply: warp::reply::Response) -> warp::reply::Response {
    reply.headers_mut().insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    reply
}

/// GET /admin/spend?by=client|model|upstream: today's and this month's spend (UTC), grouped
/// `by` (`client` when absent), largest month first; every replica's with Redis.
pub async fn spend<S>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(&request, &state)?;
    let by = match spend_group(request.query.as_deref()) {
        Some(by) => by,
        None => {
            return Err(warp::reject::custom(ProxyError::InvalidSpendGroup));
        }
    };
    let report = state.policy.ledger().report(by).await;
    let groups: Vec<serde_json::Value> = report
        .lines
        .iter()
        .map(|line| {
            json!({
                "key": line.key,
                "usd_today": usd(line.today.nanos),
                "usd_this_month": usd(line.this_month.nanos),
                "requests_today": line.today.requests,
            })
        })
        .collect();
    Ok(no_store(
        warp::reply::json(&json!({
            "by": by.as_str(),
            "day": report.day,
            "month": report.month,
            "groups": groups,
        }))
        .into_response(),
    ))
}

/// The `by` of the query: `client` when absent; `None` for anything but the three groups (or
/// `by` given twice).
fn spend_group(query: Option<&str>) -> Option<Group> {
    let mut values = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == "by")
        .map(|(_, value)| value);
    let by = values.next();
    if values.next().is_some() {
        return None;
    }
    match by {
        None => Some(Group::Client),
        Some(by) => Group::parse(&by),
    }
}

/// GET /admin/upstreams: every upstream's tier, weight, models, breaker, load, last failure and
/// keys by position; never a key.
pub fn upstreams<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    admitted(request, state)?;
    let table = state.router.table();
    let listed: Vec<serde_json::Value> = table
        .upstreams()
        .iter()
        .map(|upstream| {
            let breaker = upstream.breaker();
            let keys: Vec<serde_json::Value> = upstream
                .keys()
                .states()
                .into_iter()
                .map(|(position, state, resting_until)| {
                    json!({
                        "position": position,
                        "state": state,
                        "resting_until": resting_until.map(rfc3339_at),
                    })
                })
                .collect();
            json!({
                "name": &**upstream.name(),
                "tier": upstream.tier(),
                "weight": upstream.weight(),
                "models": upstream
                    .models()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                "breaker": {
                    "state": breaker_word(breaker.state()),
                    "closes_at": breaker.closes_at().map(rfc3339_at),
                },
                "in_flight": upstream.in_flight(),
                "last_failure": upstream.last_failure().map(|failure| failure.to_string()),
                "keys": keys,
            })
        })
        .collect();
    Ok(no_store(
        warp::reply::json(&json!({ "upstreams": listed })).into_response(),
    ))
}

pub fn breaker_word(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half_open",
        BreakerState::Open => "open",
    }
}

/// A moment on tokio's clock as RFC 3339 wall-clock time, to the second.
fn rfc3339_at(at: tokio::time::Instant) -> String {
    let now = tokio::time::Instant::now();
    let wall = if at >= now {
        std::time::SystemTime::now() + (at - now)
    } else {
        std::time::SystemTime::now() - (now - at)
    };
    humantime::format_rfc3339_seconds(wall).to_string()
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
    put(
        "usd_per_day",
        limits.usd_per_day.map(|nanos| usd(nanos).into()),
    );
    put(
        "usd_per_month",
        limits.usd_per_month.map(|nanos| usd(nanos).into()),
    );
    put(
        "default_output_reservation",
        limits.default_output_reservation.map(Into::into),
    );
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
