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
use crate::proxy::upgrade::{TunnelHold, is_websocket_upgrade};
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
    let format = policy.error_format();
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
            return refused(ProxyError::PayloadTooLarge.into_response(format));
        }
        let bytes = match tokio::time::timeout(policy.body_timeout(), read_body(body, max)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(error)) => return refused(error.into_response(format)),
            Err(_) => {
                log::info!("the request body did not arrive within UPSTREAM_TIMEOUT_SECS");
                return refused(ProxyError::RequestTimeout.into_response(format));
            }
        };
        let inspected = inspect(&headers, &bytes);
        let once = futures::stream::once(std::future::ready(Ok::<Bytes, warp::Error>(bytes)));
        (Either::Right(once), Some(inspected))
    } else {
        let streamed = body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining()));
        (Either::Left(streamed), None)
    };
    let tunnel = is_websocket_upgrade(&method, &headers);
    let mut ticket = None;
    if let Some(client) = client {
        // `GET /v1/models/{id}` names its model in the path, a Realtime WebSocket in its query.
        let model_path = (method == Method::GET && !tunnel)
            .then(|| path.strip_prefix("/v1/models/"))
            .flatten();
        let tunnel_model = tunnel
            .then(|| query_parameter(query.as_deref(), "model"))
            .flatten();
        let model = model_path.or(tunnel_model.as_deref()).or(inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref()));
        let needs_model = reads_body || model_path.is_some() || tunnel;
        if needs_model && let Err(error) = policy.check_model(client, model) {
            return refused(error.into_response(format));
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
            .map(loggable),
        ..Spend::default()
    };

    let asked = Instant::now();
    let standing = ticket.as_ref().and_then(Ticket::standing);
    let forwarded = if tunnel {
        // A tunnel's bytes are not metered, but its admission (the client's concurrency place)
        // is held as long as the tunnel is open, by the server that joins the connections.
        upstream
            .open_tunnel(headers, path, query.as_deref())
            .await
            .map(|mut forwarded| {
                if let Some(ticket) = ticket.take() {
                    forwarded
                        .response
                        .extensions_mut()
                        .insert(TunnelHold::new(ticket));
                }
                forwarded
            })
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
                    // Only a client with token limits settles from the event count; for
                    // everybody else the scan would be work for nothing.
                    count_events: client.is_some_and(|client| client.limits.counts_tokens()),
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
        response: error.into_response(format),
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

/// The first value of `name` in a query string, decoded.
fn query_parameter(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The model as the access line shows it. It comes from the caller's body, so only a short run
/// of the characters model names use is kept: a newline or a quote there would forge log lines.
fn loggable(model: &str) -> Arc<str> {
    const MAX: usize = 64;
    let kept: String = model
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-' | '@' | '+') {
                c
            } else {
                '?'
            }
        })
        .collect();
    Arc::from(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_cannot_forge_a_log_line() {
        assert_eq!(&*loggable("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(
            &*loggable("m\nPOST /v1/x status=200"),
            "m?POST?/v1/x?status?200"
        );
        assert_eq!(loggable(&"x".repeat(500)).len(), 64);
    }
}
