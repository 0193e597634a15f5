//! The limiter contract: one decision per request that checks every limit of a client and
//! charges them together, and a settlement when the request ends. The in-process backend is
//! [`super::memory::MemoryLimiter`]; a shared backend (Redis) implements the same trait.

use std::time::Duration;

use crate::config::ClientLimits;
use crate::vocab::price::{Nanos, usd};
pub use crate::vocab::standing::{Standing, TokenLimit, Window, openai_duration};
use futures::future::BoxFuture;

/// Which limit refused a request; also the `reason` label of the refusal metric.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    Requests,
    Tokens,
    Concurrency,
    Budget,
    Model,
    ModelRequired,
    /// An endpoint that generates without a readable model, outside the client's `endpoints`.
    Endpoint,
    /// A model named twice where one is read.
    DuplicateModel,
    /// The dollar budget of the UTC day, and of the UTC calendar month.
    UsdPerDay,
    UsdPerMonth,
    /// A client with a dollar budget asked for a model some candidate upstream has no price for.
    Unpriced,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requests => "requests_per_minute",
            Reason::Tokens => "tokens_per_minute",
            Reason::Concurrency => "max_concurrent_requests",
            Reason::Budget => "tokens_per_day",
            Reason::Model => "model_not_allowed",
            Reason::ModelRequired => "model_required",
            Reason::Endpoint => "endpoint_not_allowed",
            Reason::DuplicateModel => "invalid_request",
            Reason::UsdPerDay => "usd_per_day",
            Reason::UsdPerMonth => "usd_per_month",
            Reason::Unpriced => "model_unpriced",
        }
    }
}

/// The refusal metric counts a request that can never fit under the limit it exceeds.
pub fn reason_exceeded(limit: TokenLimit) -> Reason {
    match limit {
        TokenLimit::PerMinute => Reason::Tokens,
        TokenLimit::PerDay => Reason::Budget,
        TokenLimit::UsdPerDay => Reason::UsdPerDay,
        TokenLimit::UsdPerMonth => Reason::UsdPerMonth,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// When the same request would be admitted, from the limiter's state.
    pub retry_after: Duration,
    pub standing: Standing,
}

/// What `acquire` charged, handed back to `settle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    /// The dollars reserved, in nano-dollars.
    pub nanos: Nanos,
    /// The UTC day (days since 1970-01-01) the tokens and dollars were charged to (and so the
    /// month).
    pub day: u64,
    /// The backend's own reference to the place held (the Redis slot); 0 for none.
    pub slot: u64,
}

/// What `/admin/clients` shows of a client. The dollars are counted like the tokens: what the
/// requests that ended cost, and what those still in flight reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientUsage {
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub tokens_today: u64,
    pub in_flight: u64,
    #[serde(serialize_with = "as_usd")]
    pub usd_today: Nanos,
    #[serde(serialize_with = "as_usd")]
    pub usd_this_month: Nanos,
}

/// Nano-dollars as a JSON number of dollars.
fn as_usd<S: serde::Serializer>(nanos: &Nanos, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(usd(*nanos))
}

/// Every client's counts of today (tokens, dollars) and of this month (dollars), as kept across
/// restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    pub day: u64,
    pub tokens: Vec<(String, u64)>,
    /// Nano-dollars of `day`.
    pub usd_today: Vec<(String, Nanos)>,
    /// Nano-dollars of the month `day` is in.
    pub usd_month: Vec<(String, Nanos)>,
}

pub trait Limiter: Send + Sync + 'static {
    /// Checks every limit `limits` sets for `client`; when all pass, charges one request, a
    /// place in its concurrency, `estimate` tokens and `reservation` nano-dollars, all at once
    /// (a refusal charges nothing).
    fn acquire<'a>(
        &'a self,
        client: &'a str,
        limits: &'a ClientLimits,
        estimate: u64,
        reservation: Nanos,
    ) -> BoxFuture<'a, Result<(Charge, Standing), Refusal>>;

    /// Replaces the charged estimate by the tokens the request used and its reservation by the
    /// nano-dollars it cost, and gives back its place. Called from `Drop`, so it must not wait:
    /// a shared backend sends it off in the background.
    fn settle(&self, client: &str, limits: &ClientLimits, charge: Charge, used: u64, spent: Nanos);

    fn usage<'a>(&'a self, client: &'a str) -> BoxFuture<'a, ClientUsage>;

    /// Sends what `settle` left for later (a shared backend batches settlements); called once
    /// the server has drained, so that the last requests' settlements are not lost.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// The daily counts, for a backend that keeps them in this process; `None` otherwise.
    fn budgets(&self) -> Option<Budgets> {
        None
    }

    /// Puts counts read back at start-up in place (counts of another day are ignored).
    fn restore_budgets(&self, _budgets: Budgets) {}

    /// Bumped by every change to the daily counts: the state writer skips a write when it did
    /// not move.
    fn budget_generation(&self) -> u64 {
        0
    }
}
