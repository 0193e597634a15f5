//! Several upstreams routed by model: the routing table (swapped whole on reload) and the
//! failover loop.
//!
//! A request's model (after its alias) picks the candidates: the upstreams whose `models` match.
//! They are tried lowest tier first, by smooth weighted round-robin within a tier, skipping those
//! whose breaker is open or whose keys all rest; when none is usable, all are used as if healthy
//! (panic mode: a gateway never refuses a request without trying).
//!
//! A request leaves an upstream for the next only before anything reached its caller: on a
//! connection that failed, no answer head in time, or a status in `failover_on`. Every attempt,
//! on any key of any upstream, comes out of one budget (`max_attempts`) and one deadline
//! (`request_timeout_secs`), so retries never multiply.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::breaker::{BreakerState, Pass};
use super::choice::Rotation;
use super::clients::UpstreamClients;
use super::headers;
use super::request::{CallerBody, RequestBody};
use super::{Attempted, Budget, Failed, Failure, Upstream, rename};
use crate::auth::redact::Redactor;
use crate::config::{Config, ConfigError};
use crate::error::ProxyError;
use crate::ops::exchange::Way;
use crate::ops::metrics::Metrics;
use crate::shared::Shared;
use crate::shared::signals::{Signal, Signals};
use crate::vocab::models::ModelPattern;
use crate::vocab::price::Price;
use crate::vocab::{Endpoint, PriceTable};
use tokio::sync::broadcast;

/// The routing table in force. Cloning is shallow; a request loads the table once and keeps it
/// (and its upstreams) to its end, whatever a reload swaps in meanwhile.
#[derive(Clone)]
pub struct Router(Arc<ArcSwap<Table>>);

impl Router {
    /// The table `config` describes, every upstream built anew. With `REDIS_URL`, breaker
    /// openings are told to the other replicas through `signals`, and theirs heard.
    pub fn new(
        config: &Config,
        metrics: Metrics,
        redactor: Arc<Redactor>,
        shared: &Shared,
        signals: &Signals,
    ) -> Result<Router, ConfigError> {
        let table = Table::build(config, None, metrics, redactor, shared, signals)?;
        let router = Router(Arc::new(ArcSwap::from_pointee(table)));
        if shared.is_configured() {
            tokio::spawn(hear_openings(
                Arc::downgrade(&router.0),
                signals.subscribe(),
            ));
        }
        Ok(router)
    }

    pub fn table(&self) -> Arc<Table> {
        self.0.load_full()
    }

    /// Swaps in the table `config` describes: an upstream configured as before is kept whole
    /// (its pools, key states, breaker and model list), one whose settings changed is built
    /// again on the pools it had when it connects as before, and keeps its breaker.
    pub fn reload(
        &self,
        config: &Config,
        metrics: Metrics,
        redactor: Arc<Redactor>,
        shared: &Shared,
    ) -> Result<(), ConfigError> {
        let previous = self.table();
        let signals = previous.signals.clone();
        let table = Table::build(config, Some(&previous), metrics, redactor, shared, &signals)?;
        self.0.store(Arc::new(table));
        Ok(())
    }
}

/// The upstreams and how requests are routed between them.
pub struct Table {
    upstreams: Vec<Upstream>,
    default: usize,
    /// The plan of every name the file spells out (exact model names and aliases); a name that
    /// only a pattern matches gets its plan made when asked for.
    plans: FxHashMap<Box<str>, Arc<Plan>>,
    default_plan: Arc<Plan>,
    /// Whether the model decides anything: more than one upstream, an alias, a rename or a
    /// model list narrower than everything. Without, the body need not be read to route.
    by_model: bool,
    max_attempts: Option<u32>,
    failover_on: Vec<StatusCode>,
    /// `None` without an upstreams file: no deadline beyond each attempt's, as before.
    request_timeout: Option<Duration>,
    /// Whether failures count towards the breakers: only with an upstreams file. The
    /// environment's one upstream has nowhere else to send a request, and an open breaker
    /// would only turn `/readyz` unready on every replica at once after a few failed answers.
    breakers: bool,
    rotation: Rotation,
    aliases: Vec<(String, String)>,
    /// What each upstream's models cost, swapped in with the routing it prices.
    prices: Arc<PriceTable>,
    /// The plans (by label) in a panic episode, so that it is logged once, not per request.
    panicking: Mutex<Vec<Arc<str>>>,
    panics: AtomicUsize,
    metrics: Metrics,
    signals: Signals,
}

/// Where a model's requests may go.
pub struct Plan {
    /// The model served, after its alias: what the upstreams are asked for (before their own
    /// `model_names`). `None` for a request without a model.
    model: Option<Arc<str>>,
    /// A configured model name or pattern: the metrics label, never a caller's free text.
    label: Arc<str>,
    /// Lowest tier first.
    tiers: Vec<Tier>,
    candidates: usize,
}

struct Tier {
    /// The rotation's key for this set of upstreams.
    group: u64,
    /// Upstream index and weight.
    members: Vec<(usize, u32)>,
}

/// What the access line says of a forwarded request's way; kept (by the access record) until
/// the answer's last byte, with the answering upstream's count of requests in flight.
#[derive(Default, Debug)]
pub struct Trail {
    /// The upstream whose answer (or error) the caller got.
    upstream: Option<Arc<str>>,
    attempts: u32,
    /// `<upstream>:<reason>` of each upstream left, comma-separated.
    failover: Option<String>,
    held: Option<InFlight>,
}

impl Trail {
    /// A WebSocket tunnel's: one upstream, one attempt.
    pub fn tunnel(upstream: &Upstream) -> Trail {
        Trail {
            upstream: Some(upstream.name().clone()),
            attempts: 1,
            ..Trail::default()
        }
    }

    /// Holds the answering upstream's in-flight count until the trail is dropped.
    pub fn keep(&mut self, sent: InFlight) {
        self.held = Some(sent);
    }

    /// For the access line, when an upstream was asked.
    pub fn into_way(self) -> Option<Arc<dyn Way>> {
        self.upstream
            .is_some()
            .then(|| Arc::new(self) as Arc<dyn Way>)
    }
}

impl Way for Trail {
    fn upstream(&self) -> &str {
        self.upstream.as_deref().unwrap_or("-")
    }

    fn attempts(&self) -> u32 {
        self.attempts
    }

    fn failover(&self) -> Option<&str> {
        self.failover.as_deref()
    }
}

/// The request as every attempt sends it.
pub struct Outgoing<'a> {
    pub headers: HeaderMap,
    pub method: Method,
    pub endpoint: &'a Endpoint,
    /// The canonical path.
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The model the body names and where, when it was read: renamed for an upstream that
    /// calls the model otherwise.
    pub model: Option<ModelInBody<'a>>,
}

pub struct ModelInBody<'a> {
    pub name: &'a str,
    pub span: std::ops::Range<usize>,
}

impl Table {
    fn build(
        config: &Config,
        previous: Option<&Table>,
        metrics: Metrics,
        redactor: Arc<Redactor>,
        shared: &Shared,
        signals: &Signals,
    ) -> Result<Table, ConfigError> {
        let routing = &config.upstreams;
        if routing.list.len() > MAX_UPSTREAMS {
            return Err(ConfigError {
                variable: "UPSTREAMS_FILE".to_string(),
                message: format!(
                    "has {} upstreams; at most {MAX_UPSTREAMS} are supported",
                    routing.list.len()
                ),
            });
        }
        let mut upstreams = Vec::with_capacity(routing.list.len());
        for named in &routing.list {
            let before = previous.and_then(|table| {
                table
                    .upstreams
                    .iter()
                    .find(|upstream| upstream.name() == &named.name)
            });
            let upstream = match before {
                Some(before) if before.is_configured_as(named) => before.clone(),
                Some(before) => {
                    let clients = if before.connects_as(named) {
                        before.clients()
                    } else {
                        UpstreamClients::build(&named.settings.connection)?
                    };
                    log::info!(
                        "upstream {}: settings changed, rebuilt (breaker kept)",
                        named.name
                    );
                    Upstream::new(
                        config,
                        named,
                        clients,
                        metrics.clone(),
                        redactor.clone(),
                        shared,
                        signals,
                    )
                    .with_health_of(before)
                }
                None => {
                    let upstream = Upstream::new(
                        config,
                        named,
                        UpstreamClients::build(&named.settings.connection)?,
                        metrics.clone(),
                        redactor.clone(),
                        shared,
                        signals,
                    );
                    // An opening another replica told of before this upstream was built.
                    if let Some(opening) = signals.last_opening(&named.name) {
                        upstream
                            .breaker()
                            .open_until(opening.until, opening.reopenings);
                    }
                    upstream
                }
            };
            upstreams.push(upstream);
        }
        let by_model = upstreams.len() > 1
            || !routing.aliases.is_empty()
            || routing.list.iter().any(|named| {
                !named.model_names.is_empty()
                    || named
                        .models
                        .iter()
                        .all(|pattern| pattern.to_string() != "*")
            });
        let mut table = Table {
            default_plan: Arc::new(Plan::of(None, Arc::from("-"), &upstreams, |index| {
                index == routing.default
            })),
            upstreams,
            default: routing.default,
            plans: FxHashMap::default(),
            by_model,
            max_attempts: routing.max_attempts,
            failover_on: routing.failover_on.clone(),
            request_timeout: routing.file.as_ref().map(|_| routing.request_timeout),
            breakers: routing.file.is_some(),
            rotation: Rotation::default(),
            aliases: routing
                .aliases
                .iter()
                .map(|(alias, target)| (alias.clone(), target.clone()))
                .collect(),
            prices: Arc::new(routing.prices.clone()),
            panicking: Mutex::new(Vec::new()),
            panics: AtomicUsize::new(0),
            metrics,
            signals: signals.clone(),
        };
        let mut plans = FxHashMap::default();
        for upstream in &table.upstreams {
            for name in upstream.models().exact_names() {
                if let Some(plan) = table.plan_for(name) {
                    plans.insert(Box::from(name), Arc::new(plan));
                }
            }
        }
        for (alias, target) in &routing.aliases {
            if let Some(plan) = table.plan_for(target) {
                plans.insert(Box::from(alias.as_str()), Arc::new(plan));
            }
        }
        table.plans = plans;
        Ok(table)
    }

    /// Alias and the model it stands for.
    pub fn aliases(&self) -> &[(String, String)] {
        &self.aliases
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The prices of this routing's models, by the upstream that serves them.
    pub fn prices(&self) -> &Arc<PriceTable> {
        &self.prices
    }

    /// The price of `model` served by `upstream`, and the name the spend metrics and ledger
    /// count it under: one a file wrote, never a caller's free text, so that made-up names make
    /// no new series. That is the price entry that priced it (the model, or its `*` pattern),
    /// else a model or alias the routing names exactly, else the routing pattern that matched
    /// it, else `other`.
    pub fn price_of(&self, upstream: &str, model: &str) -> (Option<Price>, Arc<str>) {
        if let Some(priced) = self.prices.priced(upstream, model) {
            return (Some(priced.price), priced.entry.clone());
        }
        if self.plans.contains_key(model) {
            return (None, Arc::from(model));
        }
        let pattern = self
            .upstreams
            .iter()
            .flat_map(|upstream| upstream.models().iter())
            // `*` alone says nothing of the model.
            .find(|pattern| {
                pattern.matches(model)
                    && !matches!(pattern, ModelPattern::Prefix(prefix) if prefix.is_empty())
            });
        (
            None,
            pattern.map_or_else(
                || Arc::from(UNNAMED_MODEL),
                |pattern| Arc::from(pattern.to_string()),
            ),
        )
    }

    /// The upstream requests without a model go to.
    pub fn default_upstream(&self) -> &Upstream {
        &self.upstreams[self.default]
    }

    /// Whether requests are routed by their model (more than one place a model could go, or a
    /// name to rename): the body is then read to route it, and the model list is the merge of
    /// every upstream's.
    pub fn by_model(&self) -> bool {
        self.by_model
    }

    /// Where a request asking for `asked` goes: its alias resolved, the upstreams serving it.
    /// A model no upstream serves is refused before anything is sent.
    pub fn plan(&self, asked: Option<&str>) -> Result<Arc<Plan>, ProxyError> {
        let Some(asked) = asked.filter(|_| self.by_model) else {
            return Ok(self.default_plan.clone());
        };
        if let Some(plan) = self.plans.get(asked) {
            return Ok(plan.clone());
        }
        self.plan_for(asked)
            .map(Arc::new)
            .ok_or(ProxyError::ModelNotFound)
    }

    /// The plan of a model name (not an alias), from the patterns.
    fn plan_for(&self, model: &str) -> Option<Plan> {
        let mut label = None;
        let plan = Plan::of(
            Some(Arc::from(model)),
            Arc::from(""),
            &self.upstreams,
            |index| {
                let matched = self.upstreams[index]
                    .models()
                    .iter()
                    .find(|pattern| pattern.matches(model));
                if label.is_none() {
                    label = matched.map(|pattern| Arc::<str>::from(pattern.to_string()));
                }
                matched.is_some()
            },
        );
        let label = label?;
        Some(Plan { label, ..plan })
    }

    /// Sends the request along `plan`, failing over between upstreams before anything reached
    /// the caller. The answer comes with the upstream that gave it, whose key masks and
    /// adapters the reply needs.
    pub async fn forward(
        &self,
        plan: &Plan,
        mut outgoing: Outgoing<'_>,
        body: CallerBody,
    ) -> (Result<(reqwest::Response, InFlight), ProxyError>, Trail) {
        let mut trail = Trail::default();
        let first = self.default_upstream();
        let retries = self.max_attempts != Some(1)
            && (plan.candidates > 1
                || plan
                    .tiers
                    .iter()
                    .flat_map(|tier| &tier.members)
                    .any(|(index, _)| self.upstreams[*index].keys().len() > 1));
        let mut body = match body.for_attempts(&first.body_rules(), retries).await {
            Ok(body) => body,
            Err(error) => return (Err(error), trail),
        };
        let mut budget = Budget {
            left: self.max_attempts,
            spent: 0,
            deadline: self
                .request_timeout
                .map(|timeout| tokio::time::Instant::now() + timeout),
            failover_on: &self.failover_on,
            others: false,
        };
        let mut tried = Upstreams::default();
        let mut left: Vec<(Arc<str>, Failure)> = Vec::new();
        let mut last: Option<(Failed, InFlight)> = None;
        let mut unavailable: Option<ProxyError> = None;
        let mut panic = false;
        // The caller's headers go to the first attempt as they are; when another attempt may
        // follow, a list of them is kept to make its map from.
        let mut headers = Some(std::mem::take(&mut outgoing.headers));
        let mut listed: Option<Vec<(HeaderName, HeaderValue)>> = None;
        loop {
            if budget.left == Some(0)
                || budget
                    .deadline
                    .is_some_and(|deadline| tokio::time::Instant::now() >= deadline)
            {
                break;
            }
            let Some((index, pass)) = self.next(plan, &tried, &mut panic) else {
                break;
            };
            if let Some((name, reason)) = last
                .as_ref()
                .map(|(failed, sent)| (sent.upstream().name().clone(), failed.reason))
                && left.last().is_none_or(|(seen, _)| *seen != name)
            {
                self.metrics.failover(&name, reason.to_string());
                left.push((name, reason));
            }
            tried.insert(index);
            let upstream = &self.upstreams[index];
            budget.others = tried.count() < plan.candidates;
            let url = match upstream.url(outgoing.endpoint, outgoing.path, outgoing.query) {
                Ok(url) => url,
                Err(error) => return (Err(error), trail.ended(upstream, &budget, &left)),
            };
            let last_candidate = !budget.others || !body.replayable();
            let caller_headers = if let Some(first) = headers.take() {
                if !last_candidate {
                    listed = Some(headers::listed(&first));
                }
                first
            } else if last_candidate {
                match listed.take() {
                    Some(kept) => headers::from_listed(kept.into_iter()),
                    None => break,
                }
            } else {
                match &listed {
                    Some(kept) => headers::from_listed(kept.iter().cloned()),
                    None => break,
                }
            };
            // Read from the caller's headers as they came (a rename reads their
            // `Content-Type`), before they are made the upstream's.
            let mut renamed = self.renamed(plan, upstream, &outgoing, &body, &caller_headers);
            let mut attempt_headers = headers::request_headers(
                caller_headers,
                &upstream.0.caller_token_header,
                &upstream.0.key_header,
            );
            if renamed.is_some() {
                // The renamed body has its own length, which the client sets from it.
                attempt_headers.remove(warp::http::header::CONTENT_LENGTH);
            }
            let attempt_body = renamed.as_mut().unwrap_or(&mut body);
            // Whether earlier attempts used time this one needs: the deadline then ends it
            // before the upstream's own timeout would. (The first attempt has all the time
            // the request has.)
            let deadline_first = budget.spent > 0
                && budget.deadline.is_some_and(|deadline| {
                    deadline < tokio::time::Instant::now() + upstream.0.head_timeout
                });
            let sent = InFlight::new(upstream);
            let outcome = upstream
                .send_with_keys(
                    upstream.client(),
                    &outgoing.method,
                    url,
                    attempt_headers,
                    attempt_body,
                    &mut budget,
                )
                .await;
            match outcome {
                Attempted::Answer(answer) => {
                    pass.succeeded();
                    self.metrics.attempts(budget.spent);
                    return (Ok((answer, sent)), trail.ended(upstream, &budget, &left));
                }
                // Ended by the request's deadline before the upstream had its own
                // `timeout_secs`: not its failure. A slow tier above it used the time, and
                // counting it would open the breaker of a healthy upstream that answers slowly.
                Attempted::Failed(failed)
                    if failed.reason == Failure::Timeout
                        && deadline_first
                        && budget
                            .deadline
                            .is_some_and(|deadline| tokio::time::Instant::now() >= deadline) =>
                {
                    drop(pass);
                    last = Some((failed, sent));
                    if !body.replayable() {
                        break;
                    }
                }
                Attempted::Failed(failed) => {
                    self.failed(upstream, pass, failed.reason);
                    last = Some((failed, sent));
                    if !body.replayable() {
                        break;
                    }
                }
                Attempted::Unavailable(error) => {
                    drop(pass);
                    unavailable = Some(error);
                }
                Attempted::Stop(error) => {
                    drop(pass);
                    self.metrics.attempts(budget.spent);
                    return (Err(error), trail.ended(upstream, &budget, &left));
                }
            }
        }
        self.metrics.attempts(budget.spent);
        // Every attempt failed: the caller gets the last upstream answer as it came, else the
        // last failure's own error.
        match last {
            Some((failed, sent)) => {
                trail = trail.ended(sent.upstream(), &budget, &left);
                match failed.answer {
                    Some(answer) => (Ok((answer, sent)), trail),
                    None => (Err(failed.error), trail),
                }
            }
            None => (Err(unavailable.unwrap_or(ProxyError::BadGateway)), trail),
        }
    }

    /// The body for `upstream`, when it calls the model otherwise than the body does.
    fn renamed(
        &self,
        plan: &Plan,
        upstream: &Upstream,
        outgoing: &Outgoing<'_>,
        body: &RequestBody,
        caller_headers: &HeaderMap,
    ) -> Option<RequestBody> {
        let asked = outgoing.model.as_ref()?;
        let served = plan.model.as_deref()?;
        let wanted = upstream.upstream_name(served);
        if wanted == asked.name {
            return None;
        }
        let bytes: &Bytes = body.kept()?;
        Some(RequestBody::Kept(rename::body(
            caller_headers,
            bytes,
            asked.span.clone(),
            wanted,
        )))
    }

    /// The next upstream to try: the lowest tier with a usable candidate not tried yet, by
    /// weight within it. With none usable before anything was tried: panic mode.
    fn next(&self, plan: &Plan, tried: &Upstreams, panic: &mut bool) -> Option<(usize, Pass)> {
        if !*panic {
            let now = tokio::time::Instant::now();
            let mut refused = Upstreams::default();
            for tier in &plan.tiers {
                loop {
                    let eligible = |index| {
                        !tried.contains(index)
                            && !refused.contains(index)
                            && self.upstreams[index].has_usable_key(now)
                    };
                    // A tier of one has no turn to keep.
                    let picked = match tier.members.as_slice() {
                        [(only, _)] => Some(*only).filter(|index| eligible(*index)),
                        members => self.rotation.pick(tier.group, members, eligible),
                    };
                    let Some(picked) = picked else {
                        break;
                    };
                    match self.upstreams[picked].breaker().admit() {
                        Some(pass) => {
                            self.calm(plan);
                            return Some((picked, pass));
                        }
                        None => refused.insert(picked),
                    }
                }
            }
            if tried.count() > 0 {
                return None;
            }
            *panic = true;
            self.panic(plan, refused.count() > 0);
        }
        plan.tiers.iter().find_map(|tier| {
            self.rotation
                .pick(tier.group, &tier.members, |index| !tried.contains(index))
                .map(|picked| (picked, self.upstreams[picked].breaker().force()))
        })
    }

    /// Every candidate of `plan` is open or out of keys: they are used as if healthy. Logged
    /// once per episode; counted when breakers are why.
    fn panic(&self, plan: &Plan, breakers: bool) {
        if breakers {
            self.metrics.panic_routing(plan.label.clone());
        }
        let mut panicking = self.panicking.lock();
        if !panicking.contains(&plan.label) {
            panicking.push(plan.label.clone());
            self.panics.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "every upstream for {} has its breaker open or no usable key: requests go to \
                 them as if healthy until one recovers",
                plan.label
            );
        }
    }

    /// A usable candidate again: the panic episode of `plan`, if any, is over.
    fn calm(&self, plan: &Plan) {
        if self.panics.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut panicking = self.panicking.lock();
        if let Some(position) = panicking.iter().position(|label| *label == plan.label) {
            panicking.swap_remove(position);
            self.panics.fetch_sub(1, Ordering::Relaxed);
            log::info!("upstreams for {} usable again", plan.label);
        }
    }

    /// `upstream` failed the request: its breaker counts it, and an opening is told.
    fn failed(&self, upstream: &Upstream, pass: Pass, reason: Failure) {
        *upstream.0.last_failure.lock() = Some(reason);
        if !self.breakers {
            return;
        }
        if let Some(opened) = pass.failed() {
            let seconds = opened
                .until
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64();
            log::error!(
                "upstream {} breaker open for {seconds:.0}s after {reason} (opening {})",
                upstream.name(),
                opened.reopenings + 1
            );
            self.metrics.breaker_state(upstream.name(), BREAKER_OPEN);
            self.signals.announce(Signal::BreakerOpened {
                upstream: upstream.name().to_string(),
                remaining: opened
                    .until
                    .saturating_duration_since(tokio::time::Instant::now()),
                reopenings: opened.reopenings,
            });
        }
    }

    /// Brings the breaker gauges up to date (a breaker turns half-open by the clock, not by an
    /// event); called before the metrics are encoded.
    pub fn publish_state(&self) {
        for upstream in &self.upstreams {
            upstream.keys().publish_state();
            let state = match upstream.breaker().state() {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => BREAKER_OPEN,
            };
            self.metrics.breaker_state(upstream.name(), state);
        }
    }
}

const BREAKER_OPEN: i64 = 2;

/// At most this many upstreams in a file: a set of them is one machine word.
pub const MAX_UPSTREAMS: usize = 64;

/// The spend metrics' and ledger's name for a model no file names.
pub const UNNAMED_MODEL: &str = "other";

/// A set of upstreams by index (a request's tried ones): a bit each, no allocation per request.
#[derive(Default, Clone, Copy)]
struct Upstreams(u64);

impl Upstreams {
    fn insert(&mut self, index: usize) {
        self.0 |= 1 << index;
    }

    fn contains(&self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }

    fn count(&self) -> usize {
        self.0.count_ones() as usize
    }
}

/// Applies the breaker openings other replicas tell of to the table in force, for as long as the
/// router lives.
async fn hear_openings(router: Weak<ArcSwap<Table>>, mut heard: broadcast::Receiver<Signal>) {
    loop {
        let signal = match heard.recv().await {
            Ok(signal) => signal,
            // Missed signals: the openings among them are read with the state on the
            // subscriber's next reconnect; the next ones still come.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(router) = router.upgrade() else {
            return;
        };
        if let Signal::BreakerOpened {
            upstream,
            remaining,
            reopenings,
        } = signal
        {
            let table = router.load();
            if let Some(found) = table
                .upstreams
                .iter()
                .find(|candidate| **candidate.name() == *upstream)
            {
                found
                    .breaker()
                    .open_until(tokio::time::Instant::now() + remaining, reopenings);
                log::info!(
                    "upstream {upstream} breaker open for {:.0}s, as another replica saw",
                    remaining.as_secs_f64()
                );
            }
        }
    }
}

impl Plan {
    fn of(
        model: Option<Arc<str>>,
        label: Arc<str>,
        upstreams: &[Upstream],
        mut serves: impl FnMut(usize) -> bool,
    ) -> Plan {
        let mut tiers: Vec<Tier> = Vec::new();
        let mut candidates = 0;
        for (index, upstream) in upstreams.iter().enumerate() {
            if !serves(index) {
                continue;
            }
            candidates += 1;
            let member = (index, upstream.weight());
            match tiers
                .iter_mut()
                .find(|tier| upstreams[tier.members[0].0].tier() == upstream.tier())
            {
                Some(tier) => tier.members.push(member),
                None => tiers.push(Tier {
                    group: 0,
                    members: vec![member],
                }),
            }
        }
        tiers.sort_by_key(|tier| upstreams[tier.members[0].0].tier());
        for tier in &mut tiers {
            tier.group = group_key(&tier.members);
        }
        Plan {
            model,
            label,
            tiers,
            candidates,
        }
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// [`Plan::model`], shared rather than copied, for what outlives the request's handler.
    pub fn served(&self) -> Option<&Arc<str>> {
        self.model.as_ref()
    }

    /// Every upstream (by index) the plan may send a request to, whatever the order.
    pub fn candidates(&self) -> impl Iterator<Item = usize> + '_ {
        self.tiers
            .iter()
            .flat_map(|tier| tier.members.iter().map(|(index, _)| *index))
    }

    /// The first upstream this plan would try, for a tunnel (which is never failed over).
    pub fn first(&self) -> Option<usize> {
        self.tiers
            .first()
            .and_then(|tier| tier.members.first())
            .map(|(index, _)| *index)
    }
}

/// The rotation's key of a set of upstreams: the same set, the same turn.
fn group_key(members: &[(usize, u32)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (index, _) in members {
        index.hash(&mut hasher);
    }
    hasher.finish()
}

impl Trail {
    fn ended(
        mut self,
        upstream: &Upstream,
        budget: &Budget<'_>,
        left: &[(Arc<str>, Failure)],
    ) -> Trail {
        self.upstream = Some(upstream.name().clone());
        self.attempts = budget.spent;
        if !left.is_empty() {
            self.failover = Some(
                left.iter()
                    .map(|(name, reason)| format!("{name}:{reason}"))
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        self
    }
}

/// Counts a request in its upstream's `in_flight` from its first byte sent to its answer's
/// last (the reply holds it to the end of its body).
pub struct InFlight(Upstream);

impl InFlight {
    fn new(upstream: &Upstream) -> InFlight {
        upstream.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(upstream.clone())
    }

    /// The upstream that answered.
    pub fn upstream(&self) -> &Upstream {
        &self.0
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InFlight").field(self.0.name()).finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
