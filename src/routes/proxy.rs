//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded as is,
//! after the caller's limits (if it has any) admitted the request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::Either;
use futures::{Stream, TryStreamExt};
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Filter, Rejection};

use super::{raw_query, reports_usage, with};
use crate::auth::Caller;
use crate::auth::filters::caller;
use crate::error::ProxyError;
use crate::ops::exchange::{Exchange, Spend};
use crate::policy::request::{Inspected, inspect, read_body, takes_model};
use crate::policy::{Policy, Ticket, write_rate_limit_headers};
use crate::proxy::Upstream;
use crate::proxy::headers::{declared_length, is_event_stream};
use crate::proxy::response::Forwarded;
use crate::proxy::upgrade::is_websocket_upgrade;
use crate::proxy::usage::{Metering, Usage};

/// ANY /v1/... (POST /v1/chat/completions among them)
pub fn forward(
    state: crate::state::AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path("v1")
        .and(caller(state.auth.clone()))
        .and(warp::method())
        .and(warp::path::full())
        .and(raw_query())
        .and(warp::body::stream())
        .and(with(state.upstream.clone()))
        .and(with(state.policy.clone()))
        .and_then(forward_request)
}

#[allow(clippy::too_many_arguments)]
async fn forward_request<S, B>(
    headers: HeaderMap,
    caller: Caller,
    method: Method,
    path: FullPath,
    query: Option<String>,
    body: S,
    upstream: Upstream,
    policy: Policy,
) -> Result<warp::reply::Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let path = path.as_str();
    // Errors are answered here rather than rejected, so warp never tries another route.
    let refused = |mut response: warp::reply::Response| {
        response.extensions_mut().insert(Exchange {
            client: caller.label.clone(),
            upstream_wait: None,
            stream: false,
        });
        Ok(response)
    };
    let client = caller.client.as_ref();
    let reads_body =
        client.is_some_and(|client| client.limits.reads_body()) && takes_model(&method, path);
    let (body, inspected) = if reads_body {
        let max = policy.max_body_bytes();
        if declared_length(&headers).is_some_and(|length| length > max) {
            return refused(ProxyError::PayloadTooLarge.into_response());
        }
        let bytes = match tokio::time::timeout(policy.body_timeout(), read_body(body, max)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(error)) => return refused(error.into_response()),
            Err(_) => {
                log::info!("the request body did not arrive within UPSTREAM_TIMEOUT_SECS");
                return refused(ProxyError::RequestTimeout.into_response());
            }
        };
        let inspected = inspect(&headers, &bytes);
        let once = futures::stream::once(std::future::ready(Ok::<Bytes, warp::Error>(bytes)));
        (Either::Right(once), Some(inspected))
    } else {
        let streamed = body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining()));
        (Either::Left(streamed), None)
    };
    let mut ticket = None;
    if let Some(client) = client {
        // `GET /v1/models/{id}` names its model in the path.
        let model_path = (method == Method::GET)
            .then(|| path.strip_prefix("/v1/models/"))
            .flatten();
        let model = model_path.or(inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref()));
        let needs_model = reads_body || model_path.is_some();
        if needs_model && let Err(error) = policy.check_model(client, model) {
            return refused(error.into_response());
        }
        let estimate = inspected.as_ref().map_or(0, Inspected::estimate);
        ticket = match policy.admit(client, estimate).await {
            Ok(ticket) => Some(ticket),
            Err(response) => return refused(response),
        };
    }
    let spend = Spend {
        model: inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref())
            .map(Arc::from),
        ..Spend::default()
    };

    let asked = Instant::now();
    let standing = ticket.as_ref().and_then(Ticket::standing);
    let forwarded = if is_websocket_upgrade(&method, &headers) {
        // A tunnel's bytes are not metered; its request was admitted above like any other.
        upstream.open_tunnel(headers, path, query.as_deref()).await
    } else {
        match upstream
            .forward(headers, method, path, query.as_deref(), body)
            .await
        {
            Ok(answer) => {
                let scan = reports_usage(path);
                let metering = (scan || ticket.is_some()).then(|| Metering {
                    client: caller.label.clone(),
                    scan,
                    count_events: ticket.is_some(),
                    report: Some(settlement(
                        spend.usage.clone(),
                        ticket,
                        inspected.map_or(0, |inspected| inspected.prompt),
                        is_event_stream(answer.headers()),
                    )),
                });
                Ok(upstream.into_reply(answer, metering).await)
            }
            Err(error) => Err(error),
        }
    };
    let upstream_wait = asked.elapsed();
    let Forwarded {
        mut response,
        stream,
    } = forwarded.unwrap_or_else(|error| Forwarded {
        response: error.into_response(),
        stream: false,
    });
    if let Some(standing) = standing {
        write_rate_limit_headers(response.headers_mut(), &standing);
    }
    response.extensions_mut().insert(spend);
    response.extensions_mut().insert(Exchange {
        client: caller.label,
        upstream_wait: Some(upstream_wait),
        stream,
    });
    Ok(response)
}

/// What happens when the answer's body ends: the usage is kept for the access line, and the
/// ticket (if any) settles with the tokens used: the reported usage, else for a stream the
/// prompt estimate plus one token per content event, else the estimate charged.
fn settlement(
    cell: Arc<parking_lot::Mutex<Option<Usage>>>,
    ticket: Option<Ticket>,
    prompt_estimate: u64,
    stream: bool,
) -> crate::proxy::usage::Report {
    Box::new(move |usage: Option<Usage>, events: u64| {
        *cell.lock() = usage;
        if let Some(mut ticket) = ticket {
            let used = match usage {
                Some(usage) => usage.total,
                // The final `data: [DONE]` is not content.
                None if stream => prompt_estimate + events.saturating_sub(1),
                None => ticket.estimate(),
            };
            ticket.used(used);
        }
    })
}
