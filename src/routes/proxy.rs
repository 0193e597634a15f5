//! Everything else under `/v1/`: chat completions, embeddings, files, audio, ... forwarded under
//! its canonical path, after the caller's limits (if it has any) admitted the request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use warp::filters::path::FullPath;
use warp::http::{HeaderMap, Method};
use warp::{Buf, Rejection};

use super::Request;
use crate::auth::Caller;
use crate::error::ProxyError;
use crate::ops::exchange::{Answered, Exchange, Spend, loggable_as};
use crate::policy::request::{Inspected, SessionModels, inspect, is_multipart, session_models};
use crate::policy::{Asked, Policy, Priced, Ticket, write_rate_limit_headers};
use crate::proxy::headers::{is_event_stream, is_json};
use crate::proxy::rename;
use crate::proxy::request::CallerBody;
use crate::proxy::response::Forwarded;
use crate::proxy::router::{ModelInBody, Outgoing, Router, Table, Trail, UNNAMED_MODEL};
use crate::proxy::upgrade::TunnelHold;
use crate::proxy::usage::{Metering, Report, Seen};
use crate::state::AppState;
use crate::vocab::websocket::is_websocket_upgrade;
use crate::vocab::{Endpoint, Model, Nanos, Usage};

/// ANY /v1/... (POST /v1/chat/completions among them)
pub async fn forward<S, B>(
    request: Request<S>,
    state: AppState,
) -> Result<warp::reply::Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let Request {
        endpoint,
        method,
        path,
        query,
        headers,
        body,
    } = request;
    let caller = state.auth.caller(&headers).map_err(warp::reject::custom)?;
    Ok(forward_request(
        endpoint,
        headers,
        caller,
        method,
        path,
        query,
        body,
        state.router.clone(),
        state.policy.clone(),
    )
    .await
    .unwrap_or_else(|never| match never {}))
}

#[allow(clippy::too_many_arguments)]
async fn forward_request<S, B>(
    endpoint: Endpoint,
    headers: HeaderMap,
    caller: Caller,
    method: Method,
    path: FullPath,
    query: Option<String>,
    body: S,
    router: Router,
    policy: Policy,
) -> Result<warp::reply::Response, Infallible>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf + Send,
{
    let format = policy.error_format();
    // Errors are answered here rather than rejected, so warp never tries another route.
    let refused = |mut response: warp::reply::Response| {
        response.extensions_mut().insert(Exchange {
            client: caller.label.clone(),
            upstream_wait: None,
            stream: false,
            way: None,
        });
        Ok(response)
    };
    let Some(path) = endpoint.path(path.as_str()) else {
        return refused(ProxyError::UnreadablePath.into_response(format));
    };
    let client = caller.client.as_ref();
    let table = router.table();
    let upstream = table.default_upstream();
    let mut body = CallerBody::new(&headers, body);
    // With more than one place to go, the body is read for its model.
    let reads_body = (table.by_model() || client.is_some_and(|client| client.limits.reads_body()))
        && endpoint.model.in_body();
    let mut sessions = None;
    let inspected = if reads_body {
        match upstream.read_whole(&mut body).await {
            Ok(bytes) => {
                let inspected = inspect(&headers, &bytes);
                if let Model::Session { .. } = endpoint.model {
                    sessions = Some(session_names(&headers, &bytes, &inspected));
                }
                Some(inspected)
            }
            Err(error) => return refused(error.into_response(format)),
        }
    } else {
        None
    };
    let tunnel = is_websocket_upgrade(&method, &headers);
    let tunnel_model = match endpoint.model {
        Model::Query => query_model(query.as_deref()),
        _ => Ok(None),
    };
    // The model the upstream reads: where the policy finds it too.
    let routed_model: Option<&str> = match endpoint.model {
        Model::Body => inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref()),
        Model::Session { nested } => sessions.as_ref().and_then(|names| {
            if nested {
                names.nested.as_deref()
            } else {
                names.top.as_deref()
            }
        }),
        Model::Query => tunnel_model
            .as_ref()
            .ok()
            .and_then(|model| model.as_deref()),
        Model::None | Model::Generates => None,
    };
    let mut ticket = None;
    let mut plan = None;
    if let Some(client) = client {
        let body_model = inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref());
        let asked = match endpoint.model {
            // `GET /v1/models/{id}` names its model in the path.
            Model::None => match (method == Method::GET)
                .then(|| path.strip_prefix("/v1/models/"))
                .flatten()
            {
                Some(model) => Asked::Model {
                    model: Some(model),
                    other: None,
                },
                None => Asked::Nothing,
            },
            Model::Body => Asked::Model {
                model: body_model,
                other: None,
            },
            Model::Session { nested } => {
                let names = sessions.as_ref();
                let top = names.and_then(|names| names.top.as_deref());
                let inner = names.and_then(|names| names.nested.as_deref());
                let (model, other) = if nested { (inner, top) } else { (top, inner) };
                Asked::Model { model, other }
            }
            Model::Query => match &tunnel_model {
                Ok(model) => Asked::Model {
                    model: model.as_deref(),
                    other: None,
                },
                Err(()) => Asked::Twice,
            },
            Model::Generates => Asked::Unreadable { path },
        };
        if let Err(error) = policy.check_model(client, asked) {
            return refused(error.into_response(format));
        }
        // An alias cannot open a model the client may not use: the model it stands for must be
        // allowed too.
        match table.plan(routed_model) {
            Ok(found) => {
                if let (Some(asked), Some(served)) = (routed_model, found.model())
                    && asked != served
                    && let Err(error) = policy.check_model(
                        client,
                        Asked::Model {
                            model: Some(served),
                            other: None,
                        },
                    )
                {
                    return refused(error.into_response(format));
                }
                plan = Some(found);
            }
            Err(error) => return refused(error.into_response(format)),
        }
        let reservation = if client.limits.has_dollar_budget() {
            // Priced as the model routed (after its alias), at every upstream it may go to.
            let model = plan.as_ref().and_then(|plan| plan.model()).or(routed_model);
            let priced = match (model, endpoint.model) {
                (Some(model), _) => Priced::Model(model),
                (None, Model::None) => Priced::NotGenerating,
                (None, Model::Generates) => Priced::Unreadable { path },
                (None, _) => Priced::NoModel,
            };
            let table = &table;
            let prices = model
                .zip(plan.as_ref())
                .into_iter()
                .flat_map(|(model, plan)| {
                    plan.candidates().map(move |index| {
                        table.prices().price(table.upstreams()[index].name(), model)
                    })
                });
            match policy.reserve(client, priced, inspected.as_ref(), prices) {
                Ok(reservation) => reservation,
                Err(error) => return refused(error.into_response(format)),
            }
        } else {
            0
        };
        ticket = match policy.admit(client, inspected.as_ref(), reservation).await {
            Ok(ticket) => Some(ticket),
            Err(response) => return refused(response),
        };
    }
    let plan = match plan {
        Some(plan) => plan,
        None => match table.plan(routed_model) {
            Ok(plan) => plan,
            Err(error) => return refused(error.into_response(format)),
        },
    };
    // With an upstreams file, a model's entry is the merged list's (the list and the routing
    // agree on what exists).
    if table.by_model()
        && method == Method::GET
        && let Some(id) = path.strip_prefix("/v1/models/")
    {
        let mut reply = crate::routes::models::model_entry(&table, id, format).await;
        reply.extensions_mut().insert(Exchange {
            client: caller.label.clone(),
            upstream_wait: None,
            stream: false,
            way: None,
        });
        return Ok(reply);
    }
    let spend = Spend {
        model: inspected
            .as_ref()
            .and_then(|inspected| inspected.model.as_deref())
            // Usually the plan's own name (no alias): shared, not copied.
            .map(|model| loggable_as(model, plan.served())),
        ..Spend::default()
    };

    let asked = Instant::now();
    let standing = ticket.as_ref().and_then(Ticket::standing);
    let way;
    let forwarded = if tunnel {
        // A tunnel's bytes are not metered, but its admission (the client's concurrency place)
        // is held as long as the tunnel is open, by the server that joins the connections. It
        // goes to the first candidate and is never failed over: an upgrade is a conversation.
        let upstream = plan
            .first()
            .and_then(|index| table.upstreams().get(index))
            .unwrap_or(upstream);
        let renamed_query = match (routed_model, plan.model()) {
            (Some(asked), Some(served)) if upstream.upstream_name(served) != asked => query
                .as_deref()
                .map(|query| rename::query(query, upstream.upstream_name(served))),
            _ => None,
        };
        way = Trail::tunnel(upstream).into_way();
        upstream
            .open_tunnel(
                headers,
                &endpoint,
                path,
                renamed_query.as_deref().or(query.as_deref()),
            )
            .await
            .map(|mut forwarded| {
                if let Some(mut ticket) = ticket.take() {
                    // A tunnel's usage is not read: it keeps what it reserved.
                    let reserved = ticket.reservation();
                    ticket.spent(reserved);
                    forwarded
                        .response
                        .extensions_mut()
                        .insert(TunnelHold::new(ticket));
                }
                forwarded
            })
    } else {
        let model = match (routed_model, inspected.as_ref()) {
            (Some(name), Some(inspected)) => inspected
                .model_span
                .clone()
                .map(|span| ModelInBody { name, span }),
            _ => None,
        };
        let outgoing = Outgoing {
            headers,
            method,
            endpoint: &endpoint,
            path,
            query: query.as_deref(),
            model,
        };
        // The model a cost is priced as: the one routed (after its alias, before an upstream's
        // own name for it), else the one the body names; else the answer's, found at its end.
        // The plan's own name when it has one: shared, not copied.
        let served: Option<Arc<str>> = match plan.served() {
            Some(served) => Some(served.clone()),
            None => routed_model.map(Arc::from),
        };
        let (result, mut trail) = table.forward(&plan, outgoing, body).await;
        let forwarded = match result {
            Ok((answer, sent)) => {
                let scan = endpoint.reports_usage;
                // The access line names a model for every request: when the body was not read
                // for it, the answer's is looked for (JSON and event streams only).
                let find_model = spend.model.is_none()
                    && (is_json(answer.headers()) || is_event_stream(answer.headers()));
                let metering = (scan || find_model || ticket.is_some()).then(|| Metering {
                    client: caller.label.clone(),
                    scan,
                    find_model,
                    // Only a client with token limits settles from the event count; for
                    // everybody else the scan would be work for nothing.
                    count_events: client.is_some_and(|client| client.limits.counts_tokens()),
                    report: Some(settlement(
                        spend.answered.clone(),
                        ticket,
                        inspected.as_ref().map_or(0, |inspected| inspected.prompt),
                        is_event_stream(answer.headers()),
                        Pricing {
                            table: table.clone(),
                            policy: policy.clone(),
                            client: caller.label.clone(),
                            upstream: sent.upstream().name().clone(),
                            model: served,
                        },
                    )),
                });
                let reply = sent.upstream().into_reply(answer, metering).await;
                trail.keep(sent);
                Ok(reply)
            }
            Err(error) => Err(error),
        };
        way = trail.into_way();
        forwarded
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
        way,
    });
    Ok(response)
}

/// What prices an answer: the routing's prices (the ones in force when the request came), who
/// asked, the upstream that answered and the model it served.
struct Pricing {
    table: Arc<Table>,
    policy: Policy,
    client: Arc<str>,
    upstream: Arc<str>,
    /// `None` when the body was not read: the answer names it.
    model: Option<Arc<str>>,
}

impl Pricing {
    /// What the answer's usage cost, counted in the metrics and the spend ledger: `None`
    /// without usage, without any price configured, or for a model without a price (counted
    /// as unpriced).
    fn cost(self, usage: Option<Usage>, answered_model: Option<&Arc<str>>) -> Option<Nanos> {
        let usage = usage?;
        // Without a price anywhere, spend is not tracked (start-up says so once): nothing is
        // looked up, and nothing is counted as unpriced.
        if self.table.prices().is_empty() {
            return None;
        }
        let model = self.model.as_ref().or(answered_model);
        let (price, name) = match model {
            Some(model) => self.table.price_of(&self.upstream, model),
            None => (None, Arc::from(UNNAMED_MODEL)),
        };
        let cost = price.map(|price| price.cost(&usage));
        self.policy.spent(&self.client, &self.upstream, &name, cost);
        cost
    }
}

/// What happens when the answer's body ends: its usage, model and cost are kept for the access
/// line, the cost is counted, and the ticket (if any) settles with the tokens used: the
/// reported usage, else for a stream the prompt estimate plus one token per content event,
/// else the estimate charged. Its dollars settle at what the reported usage cost at the
/// upstream that served it; without a usage (or a price) the reservation is kept: an answer
/// whose cost is unknown is never counted as free. (A failed or refused request never gets
/// here: its ticket is dropped, and costs nothing.)
fn settlement(
    cell: Arc<parking_lot::Mutex<Answered>>,
    ticket: Option<Ticket>,
    prompt_estimate: u64,
    stream: bool,
    pricing: Pricing,
) -> Report {
    Box::new(move |seen: Seen| {
        let Seen {
            usage,
            events,
            model,
        } = seen;
        let cost = pricing.cost(usage, model.as_ref());
        *cell.lock() = Answered { usage, model, cost };
        if let Some(mut ticket) = ticket {
            let reserved = ticket.reservation();
            ticket.spent(cost.unwrap_or(reserved));
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

/// The tunnel's `model` query parameter, decoded (`None` when absent or empty); `Err` when it is
/// there more than once, spelled alike once decoded (`model`, `%6Dodel`): upstream frameworks
/// differ on which of two values they take.
fn query_model(query: Option<&str>) -> Result<Option<String>, ()> {
    let mut values = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == "model")
        .map(|(_, value)| value);
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first
        .filter(|value| !value.is_empty())
        .map(|value| value.into_owned()))
}

/// The models a realtime session's body names: both places of a JSON body, or the form field of
/// a multipart one (its `session` part is not read).
fn session_names(headers: &HeaderMap, body: &[u8], inspected: &Inspected) -> SessionModels {
    if is_multipart(headers) {
        return SessionModels {
            top: inspected.model.clone(),
            nested: None,
        };
    }
    session_models(body).unwrap_or_default()
}
