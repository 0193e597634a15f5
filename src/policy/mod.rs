//! Per-client limits, budgets and model lists. The [`Policy`] handle decides, before anything
//! goes upstream, whether a client's request may go; the [`Ticket`] it hands out holds the
//! request's charge until the answer ends, and then settles it with the tokens used.
//!
//! The limiter state sits behind the [`Limiter`] trait: in this process ([`MemoryLimiter`]) by
//! default; a shared backend can take its place without the routes noticing.

pub mod ledger;
pub mod limiter;
pub mod memory;
pub mod redis;
pub mod request;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use warp::http::HeaderMap;

use crate::config::{Client, ClientLimits, Config};
use crate::error::{ErrorFormat, ProxyError};
use crate::ops::metrics::Metrics;
use crate::vocab::{Nanos, Price};
pub use ledger::Ledger;
pub use limiter::{ClientUsage, Limiter, Reason, Refusal, Standing, TokenLimit, Window};
pub use memory::MemoryLimiter;
pub use redis::RedisLimiter;
use request::Inspected;

/// The limiter and what the routes need around it. Cloning is shallow.
#[derive(Clone)]
pub struct Policy(Arc<Inner>);

struct Inner {
    limiter: Arc<dyn Limiter>,
    ledger: Ledger,
    metrics: Metrics,
    /// `ERROR_FORMAT`: how refusals are written.
    error_format: ErrorFormat,
}

impl Policy {
    pub fn new(
        config: &Config,
        limiter: Arc<dyn Limiter>,
        ledger: Ledger,
        metrics: Metrics,
    ) -> Policy {
        Policy(Arc::new(Inner {
            limiter,
            ledger,
            metrics,
            error_format: config.error_format,
        }))
    }

    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.0.limiter
    }

    /// The spend ledger, for `/admin/spend`.
    pub fn ledger(&self) -> &Ledger {
        &self.0.ledger
    }

    /// Where every answered request's cost arrives, once, when its body ended: `Some` with what
    /// it cost, or `None` when it came with usage for a model without a price. Counted in the
    /// metrics and the ledger under `model`, a name from the files (see
    /// [`crate::proxy::router::Table::price_of`]).
    pub fn spent(
        &self,
        client: &Arc<str>,
        upstream: &Arc<str>,
        model: &Arc<str>,
        cost: Option<Nanos>,
    ) {
        match cost {
            Some(nanos) => {
                // One reading of the wall clock for the status page's minute and the ledger's day.
                let wall = std::time::SystemTime::now();
                self.0.metrics.spend(client, upstream, model, nanos);
                self.0.metrics.activity().record_spend(wall, nanos);
                self.0.ledger.record(wall, client, model, upstream, nanos);
            }
            None => self.0.metrics.unpriced(upstream, model),
        }
    }

    /// `ERROR_FORMAT`, for the answers the routes write from this handle's refusals.
    pub fn error_format(&self) -> ErrorFormat {
        self.0.error_format
    }

    /// The model check: `Ok` when the client may make the request (or has no list).
    pub fn check_model(&self, client: &Client, asked: Asked<'_>) -> Result<(), ProxyError> {
        let limits = &client.limits;
        if limits.models.is_none() {
            return Ok(());
        }
        let refused = |model: &str| !limits.allows_model(model);
        let (error, reason) = match asked {
            Asked::Nothing => return Ok(()),
            Asked::Model { model: None, .. } => (ProxyError::ModelRequired, Reason::ModelRequired),
            Asked::Model {
                model: Some(model),
                other,
            } if refused(model) || other.is_some_and(refused) => {
                (ProxyError::ModelNotAllowed, Reason::Model)
            }
            Asked::Model { .. } => return Ok(()),
            Asked::Twice => (ProxyError::DuplicateModel, Reason::DuplicateModel),
            Asked::Unreadable { path } if limits.allows_endpoint(path) => return Ok(()),
            Asked::Unreadable { .. } => (ProxyError::EndpointNotAllowed, Reason::Endpoint),
        };
        self.0.metrics.limit_refusal(&client.name, reason.as_str());
        Err(error)
    }

    /// What a request of a client with a dollar budget reserves before it goes (0 for any other
    /// client): see [`reservation`]. A refusal is counted and answered here.
    pub fn reserve(
        &self,
        client: &Client,
        priced: Priced<'_>,
        inspected: Option<&Inspected>,
        prices: impl IntoIterator<Item = Option<Price>>,
    ) -> Result<Nanos, ProxyError> {
        let reserved = reservation(&client.limits, priced, inspected, prices);
        if let Err(error) = reserved {
            let reason = match error {
                ProxyError::ModelRequired => Reason::ModelRequired,
                _ => Reason::Unpriced,
            };
            self.0.metrics.limit_refusal(&client.name, reason.as_str());
        }
        reserved
    }

    /// Admits the request or answers the refusal. A client without limits is always admitted,
    /// and counted all the same: `/admin/clients` shows everybody's usage. `inspected` is what
    /// was read from the body, when it was read; `reservation` the nano-dollars
    /// [`Policy::reserve`] set aside for it.
    pub async fn admit(
        &self,
        client: &Arc<Client>,
        inspected: Option<&Inspected>,
        reservation: Nanos,
    ) -> Result<Ticket, warp::reply::Response> {
        let refused = inspected
            .and_then(|inspected| refused_outright(&client.limits, inspected))
            .or_else(|| {
                exceeded_dollars(&client.limits, reservation)
                    .map(|limit| ProxyError::RequestExceedsLimit { limit })
            });
        if let Some(error) = refused {
            if let ProxyError::RequestExceedsLimit { limit } = error {
                self.0
                    .metrics
                    .limit_refusal(&client.name, limiter::reason_exceeded(limit).as_str());
            }
            return Err(error.into_response(self.0.error_format));
        }
        let estimate = inspected.map_or(0, Inspected::estimate);
        match self
            .0
            .limiter
            .acquire(&client.name, &client.limits, estimate, reservation)
            .await
        {
            Ok((charge, standing)) => Ok(Ticket {
                limiter: self.0.limiter.clone(),
                client: client.clone(),
                charge,
                standing,
                used: None,
                spent: 0,
            }),
            Err(refusal) => {
                self.0
                    .metrics
                    .limit_refusal(&client.name, refusal.reason.as_str());
                Err(refusal_response(&refusal, client, self.0.error_format))
            }
        }
    }
}

/// What is refused from the request alone, before the limiter is asked: no state is read, so it
/// is cheap and the same for every backend. Only for a client with token limits or a dollar
/// budget: for anybody else the upstream judges an odd `max_tokens`, and nothing is too large.
fn refused_outright(limits: &ClientLimits, inspected: &Inspected) -> Option<ProxyError> {
    if !limits.counts_tokens() && !limits.has_dollar_budget() {
        return None;
    }
    if inspected.invalid_output_cap {
        return Some(ProxyError::InvalidOutputCap);
    }
    exceeded_limit(limits, inspected.estimate())
        .map(|limit| ProxyError::RequestExceedsLimit { limit })
}

/// The token limit an estimate is larger than; when it is larger than both, the smaller, which
/// is the one it has to come under. Exactly the limit fits: a client idle for a minute may use
/// its whole `tokens_per_minute` at once (the GCRA's burst), and a fresh day its whole budget.
pub fn exceeded_limit(limits: &ClientLimits, estimate: u64) -> Option<TokenLimit> {
    [
        (limits.tokens_per_minute, TokenLimit::PerMinute),
        (limits.tokens_per_day, TokenLimit::PerDay),
    ]
    .into_iter()
    .filter_map(|(limit, name)| Some((limit?, name)))
    .filter(|(limit, _)| estimate > *limit)
    .min_by_key(|(limit, _)| *limit)
    .map(|(_, name)| name)
}

/// The dollar budget a reservation alone is larger than (the smaller when both): such a
/// request can never be admitted, so it is told so rather than to wait. Exactly the budget fits.
pub fn exceeded_dollars(limits: &ClientLimits, reservation: Nanos) -> Option<TokenLimit> {
    [
        (limits.usd_per_day, TokenLimit::UsdPerDay),
        (limits.usd_per_month, TokenLimit::UsdPerMonth),
    ]
    .into_iter()
    .filter_map(|(limit, name)| Some((limit?, name)))
    .filter(|(limit, _)| reservation > *limit)
    .min_by_key(|(limit, _)| *limit)
    .map(|(_, name)| name)
}

/// What a request is priced as, for [`reservation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priced<'a> {
    /// The model routed (after its alias).
    Model(&'a str),
    /// The endpoint reads a model and the request names none.
    NoModel,
    /// The endpoint makes the upstream generate nothing (files, listings, cancellations).
    NotGenerating,
    /// The endpoint at this canonical path can generate without naming a model the proxy can
    /// read.
    Unreadable { path: &'a str },
}

/// The nano-dollars a request reserves before it goes, for a client with a dollar budget (0 for
/// any other): the prompt estimate at `input` plus the request's output cap (or the client's
/// `default_output_reservation`) at `output`, at the dearest of `prices`, one per upstream the
/// request may be sent to (failing over can then never cost more than was reserved).
///
/// Refused (nothing is sent) when it cannot be priced: a candidate without a price for the model
/// (`model_unpriced`), an endpoint that reads a model and was given none (`model_required`), or
/// an endpoint that generates without naming a model the proxy can read, unless the client's
/// `endpoints` lists it (`model_unpriced`; such a request then reserves nothing, and settles
/// at what its answer's usage costs when its model is priced). An endpoint that generates
/// nothing reserves nothing.
pub fn reservation(
    limits: &ClientLimits,
    priced: Priced<'_>,
    inspected: Option<&Inspected>,
    prices: impl IntoIterator<Item = Option<Price>>,
) -> Result<Nanos, ProxyError> {
    if !limits.has_dollar_budget() {
        return Ok(0);
    }
    match priced {
        Priced::NotGenerating => return Ok(0),
        Priced::NoModel => return Err(ProxyError::ModelRequired),
        Priced::Unreadable { path } if limits.allows_endpoint(path) => return Ok(0),
        Priced::Unreadable { .. } => return Err(ProxyError::ModelUnpriced),
        Priced::Model(_) => {}
    }
    let (prompt, output) = inspected.map_or((0, limits.output_reservation()), |inspected| {
        // A cap of 0 reads as none (the body says no more than that): the default is reserved.
        let output = if inspected.output_cap > 0 {
            inspected.output_cap
        } else {
            limits.output_reservation()
        };
        (inspected.prompt, output)
    });
    let mut dearest = None;
    for price in prices {
        let price = price.ok_or(ProxyError::ModelUnpriced)?;
        let reserved = price.reservation(prompt, output);
        dearest = Some(dearest.map_or(reserved, |dearest: Nanos| dearest.max(reserved)));
    }
    // A plan always has a candidate; none would leave nothing to price.
    dearest.ok_or(ProxyError::ModelUnpriced)
}

/// What a request names for the model check, read where its endpoint names it (see
/// [`crate::vocab::Model`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked<'a> {
    /// Nothing to check: the request makes the upstream generate nothing.
    Nothing,
    /// `model` is what the request names where the endpoint reads it (`None`: nothing readable
    /// there); `other` another model it names that the upstream may read too (a realtime
    /// session's `model` beside its `session.model`), checked as well.
    Model {
        model: Option<&'a str>,
        other: Option<&'a str>,
    },
    /// The model named more than once where one is read.
    Twice,
    /// The endpoint at this canonical path can generate without naming a model where the proxy
    /// can read it.
    Unreadable { path: &'a str },
}

/// A request's charge against its client's limits, held until its answer ends. Dropped without
/// [`Ticket::used`], it settles as having used no tokens, and without [`Ticket::spent`] as
/// having cost nothing (the upstream failed or refused).
pub struct Ticket {
    limiter: Arc<dyn Limiter>,
    /// The client as it was when the request was admitted: a reload does not change its rules.
    client: Arc<Client>,
    charge: limiter::Charge,
    standing: Standing,
    used: Option<u64>,
    spent: Nanos,
}

impl Ticket {
    pub fn estimate(&self) -> u64 {
        self.charge.tokens
    }

    /// The nano-dollars reserved before the call (0 for a client without a dollar budget).
    pub fn reservation(&self) -> Nanos {
        self.charge.nanos
    }

    /// Records what the request cost, in nano-dollars; the settlement happens when the ticket is
    /// dropped.
    pub fn spent(&mut self, nanos: Nanos) {
        self.spent = nanos;
    }

    /// The client's own `x-ratelimit-*` standing, for a client with limits.
    pub fn standing(&self) -> Option<Standing> {
        self.client.limits.is_limited().then_some(self.standing)
    }

    /// Records what the request used; the settlement happens when the ticket is dropped.
    pub fn used(&mut self, tokens: u64) {
        self.used = Some(tokens);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.limiter.settle(
            &self.client.name,
            &self.client.limits,
            self.charge,
            self.used.unwrap_or(0),
            self.spent,
        );
    }
}

/// Puts the client's own `x-ratelimit-*` headers in place of whatever the upstream sent, which
/// describes the shared key's quota rather than this client's.
pub fn write_rate_limit_headers(headers: &mut HeaderMap, standing: &Standing) {
    standing.write_headers(headers);
}

/// The 429 for a refusal, with `Retry-After` in whole seconds rounded up (so the request is
/// admitted by then, never before it). A concurrency refusal names the client's limit: it is
/// the one limit without a per-minute window in `standing`.
pub fn refusal_response(
    refusal: &Refusal,
    client: &Client,
    format: ErrorFormat,
) -> warp::reply::Response {
    let retry_after = retry_after_secs(refusal.retry_after);
    let error = match refusal.reason {
        Reason::Budget => ProxyError::QuotaExceeded {
            retry_after,
            standing: refusal.standing,
        },
        Reason::UsdPerDay | Reason::UsdPerMonth => ProxyError::BudgetExceeded {
            retry_after,
            standing: refusal.standing,
        },
        reason => ProxyError::RateLimited {
            retry_after,
            standing: refusal.standing,
            concurrency: (reason == Reason::Concurrency)
                .then_some(client.limits.max_concurrent_requests)
                .flatten(),
        },
    };
    error.into_response(format)
}

pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::limiter::openai_duration;
    use super::*;

    #[test]
    fn an_estimate_exceeds_a_limit_only_when_it_is_larger_than_it() {
        let limits = |minute, day| ClientLimits {
            tokens_per_minute: minute,
            tokens_per_day: day,
            ..ClientLimits::default()
        };
        assert_eq!(exceeded_limit(&limits(Some(100), None), 100), None);
        assert_eq!(
            exceeded_limit(&limits(Some(100), None), 101),
            Some(TokenLimit::PerMinute)
        );
        assert_eq!(exceeded_limit(&limits(None, Some(1000)), 1000), None);
        assert_eq!(
            exceeded_limit(&limits(Some(5000), Some(1000)), 1001),
            Some(TokenLimit::PerDay)
        );
        // Larger than both: the smaller is named, the one it has to come under.
        assert_eq!(
            exceeded_limit(&limits(Some(5000), Some(1000)), 9000),
            Some(TokenLimit::PerDay)
        );
        assert_eq!(
            exceeded_limit(&limits(Some(500), Some(1000)), 9000),
            Some(TokenLimit::PerMinute)
        );
        assert_eq!(exceeded_limit(&limits(None, None), u64::MAX), None);
    }

    #[test]
    fn a_reservation_is_the_dearest_candidates_and_nothing_unpriced_is_reserved() {
        let budget = ClientLimits {
            usd_per_day: Some(1_000_000_000),
            default_output_reservation: Some(100),
            endpoints: Some(vec!["/v1/batches*".to_string()]),
            ..ClientLimits::default()
        };
        // Picos per token (3 and 1 nano-dollars, 1 and 10): one upstream dearer on input, the
        // other on output.
        let cheap = Price {
            input: 3_000,
            cached_input: None,
            output: 1_000,
        };
        let dear = Price {
            input: 1_000,
            cached_input: None,
            output: 10_000,
        };
        let inspected = |output_cap| Inspected {
            prompt: 1000,
            output_cap,
            ..Inspected::default()
        };
        let model = Priced::Model("m");
        // 1000 in, 50 out: 3000 + 50 nanos at the first, 1000 + 500 at the second.
        assert_eq!(
            reservation(
                &budget,
                model,
                Some(&inspected(50)),
                [Some(cheap), Some(dear)]
            ),
            Ok(3_050)
        );
        // No cap: the client's default of 100 out (3100 and 2000).
        assert_eq!(
            reservation(
                &budget,
                model,
                Some(&inspected(0)),
                [Some(cheap), Some(dear)]
            ),
            Ok(3_100)
        );
        assert_eq!(
            reservation(
                &budget,
                model,
                Some(&inspected(1000)),
                [Some(cheap), Some(dear)]
            ),
            Ok(11_000)
        );
        // One candidate without a price: refused, whatever the others cost.
        assert_eq!(
            reservation(&budget, model, Some(&inspected(50)), [Some(cheap), None]),
            Err(ProxyError::ModelUnpriced)
        );
        assert_eq!(
            reservation(&budget, Priced::NoModel, None, []),
            Err(ProxyError::ModelRequired)
        );
        assert_eq!(reservation(&budget, Priced::NotGenerating, None, []), Ok(0));
        let batches = Priced::Unreadable {
            path: "/v1/batches",
        };
        assert_eq!(reservation(&budget, batches, None, []), Ok(0));
        let evals = Priced::Unreadable { path: "/v1/evals" };
        assert_eq!(
            reservation(&budget, evals, None, []),
            Err(ProxyError::ModelUnpriced)
        );
        // Without a dollar budget nothing is priced, and nothing refused.
        let free = ClientLimits::default();
        assert_eq!(reservation(&free, model, None, [None]), Ok(0));
        // A reservation above a budget can never be admitted; exactly the budget fits.
        assert_eq!(exceeded_dollars(&budget, 1_000_000_000), None);
        assert_eq!(
            exceeded_dollars(&budget, 1_000_000_001),
            Some(TokenLimit::UsdPerDay)
        );
    }

    #[test]
    fn reset_durations_are_written_the_openai_way() {
        assert_eq!(openai_duration(Duration::from_secs(12)), "12s");
        assert_eq!(openai_duration(Duration::from_millis(11_999)), "11.999s");
        assert_eq!(openai_duration(Duration::from_millis(500)), "0.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::ZERO), "0s");
        assert_eq!(openai_duration(Duration::from_millis(1_250)), "1.25s");
        assert_eq!(openai_duration(Duration::from_millis(60_010)), "1m0.01s");
        assert_eq!(openai_duration(Duration::from_micros(1)), "0.001s");
        assert_eq!(retry_after_secs(Duration::from_millis(11_001)), 12);
        assert_eq!(retry_after_secs(Duration::from_secs(12)), 12);
    }
}
