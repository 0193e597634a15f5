//! Prometheus metrics. Every label comes from a small fixed set (routes, methods, status classes,
//! failure kinds) or from the configured client list: never a raw token, path or message.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
    LabelValueEncoder, MetricEncoder, NoLabelSet,
};

/// The `Content-Type` of `Metrics::encode`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use warp::http::{Method, StatusCode};

use super::activity::Activity;
use crate::vocab::Route;
use crate::vocab::price::{Nanos, usd};

/// How an upstream exchange failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UpstreamFailure {
    Connect,
    /// This process ran out of file descriptors: not the upstream's fault.
    LocalLimit,
    Timeout,
    Reset,
    Status5xx,
    Status4xx,
}

impl UpstreamFailure {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::LocalLimit => "local_limit",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::Status5xx => "status_5xx",
            UpstreamFailure::Status4xx => "status_4xx",
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TokenKind {
    Prompt,
    Completion,
    Total,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Prompt => "prompt",
            TokenKind::Completion => "completion",
            TokenKind::Total => "total",
        }
    }
}

macro_rules! label_value_as_str {
    ($($kind:ty),*) => {$(
        impl EncodeLabelValue for $kind {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_as_str!(UpstreamFailure, TokenKind, ProbeOutcome, PassedRefusal);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `Route::label`: the two health probes share one value, so the label set is keyed by the
    /// label, not by the route.
    route: &'static str,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    /// An upstream's name in the upstreams file (`default` without one).
    upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamClassLabels {
    upstream: Arc<str>,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    upstream: Arc<str>,
    /// `connect`, `timeout` or `status_<code>` of a `failover_on` status.
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    client: Arc<str>,
    upstream: Arc<str>,
    /// A name from the files (a price entry, a routed model or alias, a routing pattern) or
    /// `other`: see `Table::price_of`.
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    client: Arc<str>,
    /// `day` (`usd_per_day`) or `month` (`usd_per_month`).
    period: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamModelLabels {
    upstream: Arc<str>,
    model: Arc<str>,
}

/// The spend family's handles by their labels. FxHash: the labels are names from the files (a
/// client, an upstream, a price entry), never a caller's free text.
type SpendHandles = hashbrown::HashMap<SpendLabels, DollarCounter, rustc_hash::FxBuildHasher>;

/// [`SpendLabels`] borrowed, to look a handle up without cloning the labels. It hashes as
/// `SpendLabels` does (the derived `Hash` hashes each field in order, and an `Arc<str>` as its
/// `str`), which `Equivalent` requires.
#[derive(Hash)]
struct SpendKey<'a>(&'a str, &'a str, &'a str);

impl hashbrown::Equivalent<SpendLabels> for SpendKey<'_> {
    fn equivalent(&self, labels: &SpendLabels) -> bool {
        *self.0 == *labels.client && *self.1 == *labels.upstream && *self.2 == *labels.model
    }
}

/// A counter kept in nano-dollars and exposed in dollars: an integer sum is exact however many
/// requests it adds up, where a float counter would drift by a rounding per request.
#[derive(Clone, Debug, Default)]
struct DollarCounter(Arc<std::sync::atomic::AtomicU64>);

impl DollarCounter {
    fn add(&self, nanos: Nanos) {
        // Saturating, not wrapping: a counter must never go down.
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |sum| Some(sum.saturating_add(nanos)),
        );
    }
}

impl TypedMetric for DollarCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for DollarCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let nanos = self.0.load(std::sync::atomic::Ordering::Relaxed);
        encoder.encode_counter::<NoLabelSet, _, u64>(&usd(nanos), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// How an attempt sent to an upstream ended, for `llm_proxy_upstream_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptClass {
    Status(StatusCode),
    Connect,
    Timeout,
}

/// One upstream's own series.
pub struct UpstreamCounters {
    /// 2xx, 3xx, 4xx, 5xx, connect, timeout.
    classes: [Counter; 6],
    head: Histogram,
}

impl UpstreamCounters {
    pub fn request(&self, class: AttemptClass) {
        let index = match class {
            AttemptClass::Status(status) => match status.as_u16() {
                0..=299 => 0,
                300..=399 => 1,
                400..=499 => 2,
                _ => 3,
            },
            AttemptClass::Connect => 4,
            AttemptClass::Timeout => 5,
        };
        self.classes[index].inc();
    }

    /// An answer's head arrived after `wait`.
    pub fn answered(&self, status: StatusCode, wait: Duration) {
        self.request(AttemptClass::Status(status));
        self.head.observe(wait.as_secs_f64());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: UpstreamFailure,
}

/// Where an upstream key of the pool stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Usable,
    /// Rate-limited (429): back by itself when the rest is over.
    Resting,
    /// Refused (401) by a probe with the key alone: out of turn until a probe is accepted.
    Disabled,
}

/// How a probe of one upstream key alone ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A 2xx answer: the key is good.
    Accepted,
    /// 401: the key itself is refused.
    Refused,
    /// Any other answer, or none: nothing is known about the key.
    Inconclusive,
}

impl ProbeOutcome {
    fn as_str(self) -> &'static str {
        match self {
            ProbeOutcome::Accepted => "accepted",
            ProbeOutcome::Refused => "refused",
            ProbeOutcome::Inconclusive => "inconclusive",
        }
    }
}

/// An upstream refusal a key pool passed to the client without resting or disabling a key.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PassedRefusal {
    /// 401 after the request's one try on another key.
    Unauthorized,
    /// 403: it belongs to the request.
    Forbidden,
    /// 429 for a request larger than the limit itself.
    TooLarge,
}

impl PassedRefusal {
    fn as_str(self) -> &'static str {
        match self {
            PassedRefusal::Unauthorized => "401",
            PassedRefusal::Forbidden => "403",
            PassedRefusal::TooLarge => "429",
        }
    }
}

/// The labels of the per-key families. Encoded by hand: `upstream` is left out where it is
/// `None` (no upstreams file, one pool), so those series stay as they were before upstreams
/// files existed; the derive would write `upstream=""` instead.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct KeyLabels {
    /// The upstream the pool belongs to, with an upstreams file: each upstream has its own pool,
    /// and positions alone would mix their keys.
    upstream: Option<Arc<str>>,
    /// The key's 1-based position in its pool (`AUTH_BEARER`, `keys_file` or `keys_env`):
    /// never any part of the key.
    key: u64,
}

impl EncodeLabelSet for KeyLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(upstream) = &self.upstream {
            ("upstream", upstream.as_ref()).encode(encoder.encode_label())?;
        }
        ("key", self.key).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct KeyProbeLabels {
    key: KeyLabels,
    outcome: ProbeOutcome,
}

impl EncodeLabelSet for KeyProbeLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.key.encode(encoder)?;
        ("outcome", self.outcome).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassedRefusalLabels {
    status: PassedRefusal,
}

/// Where the state shared by replicas (key rests, later the per-client limits) is kept.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StateMode {
    /// In Redis, shared by every replica that points at it.
    Shared,
    /// In this process: no `REDIS_URL`, or Redis is unreachable or slow.
    Local,
}

impl StateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StateMode::Shared => "shared",
            StateMode::Local => "local",
        }
    }
}

/// Why a Redis call did not give an answer.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RedisFailure {
    /// No answer within `REDIS_TIMEOUT_MS`.
    Timeout,
    /// Connection refused, reset or not established.
    Connection,
    /// Redis answered with an error.
    Error,
}

impl RedisFailure {
    fn as_str(self) -> &'static str {
        match self {
            RedisFailure::Timeout => "timeout",
            RedisFailure::Connection => "connection",
            RedisFailure::Error => "error",
        }
    }
}

label_value_as_str!(StateMode, RedisFailure);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: StateMode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisFailureLabels {
    kind: RedisFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    client: Arc<str>,
    /// The limit that refused: a field name of the clients file, or the model checks.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    client: Arc<str>,
    kind: TokenKind,
}

fn latency_histogram() -> Histogram {
    // From a cached model list (sub-millisecond) to a long generation (minutes).
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0,
    ])
}

fn overhead_histogram() -> Histogram {
    Histogram::new([
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
    ])
}

/// All metric families, registered once. Cloning is shallow.
#[derive(Clone)]
pub struct Metrics(Arc<Families>);

struct Families {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    time_to_first_byte: Family<RouteLabels, Histogram>,
    overhead: Family<RouteLabels, Histogram>,
    requests_in_flight: Gauge,
    streams_in_flight: Gauge,
    upstream_failures: Family<FailureLabels, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_fetches: Counter,
    tokens: Family<TokenLabels, Counter>,
    key_requests: Family<KeyLabels, Counter>,
    key_rate_limited: Family<KeyLabels, Counter>,
    key_resting: Family<KeyLabels, Gauge>,
    key_disabled: Family<KeyLabels, Gauge>,
    key_probes: Family<KeyProbeLabels, Counter>,
    refusals_passed: Family<PassedRefusalLabels, Counter>,
    limit_refusals: Family<RefusalLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    clients_file_missing: Gauge,
    state_mode: Family<ModeLabels, Gauge>,
    redis_failures: Family<RedisFailureLabels, Counter>,
    upstream_requests: Family<UpstreamClassLabels, Counter>,
    upstream_head: Family<UpstreamLabels, Histogram>,
    failovers: Family<FailoverLabels, Counter>,
    breaker_state: Family<UpstreamLabels, Gauge>,
    attempts: Histogram,
    panic_routing: Family<ModelLabels, Counter>,
    spend: Family<SpendLabels, DollarCounter>,
    /// The spend family's handles, found without the family's SipHash of three labels under its
    /// lock, nor a clone of each label, on every priced request (see [`SpendKey`]). A handle
    /// shares the family's storage, and the family never drops a series, so a kept handle never
    /// goes stale.
    spend_handles: parking_lot::Mutex<SpendHandles>,
    budgets: Family<BudgetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    unpriced: Family<UpstreamModelLabels, Counter>,
    /// The last hour minute by minute, for the status page: fed where the families above are.
    activity: Activity,
    /// Per-route histogram handles, indexed by `Route::index`: a family lookup hashes the
    /// labels under a lock on every request; the handles share the family's storage, so the
    /// exposition is unchanged.
    cached: [RouteHandles; Route::COUNT],
}

#[derive(Default)]
struct RouteHandles {
    duration: std::sync::OnceLock<Histogram>,
    ttfb: std::sync::OnceLock<Histogram>,
    overhead: std::sync::OnceLock<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("llm_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, method and status class",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Whole exchange, from request to the last byte of the response",
            duration.clone(),
        );
        let time_to_first_byte = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "time_to_first_byte_seconds",
            "From request to the first response body byte",
            time_to_first_byte.clone(),
        );
        let overhead = Family::<RouteLabels, Histogram>::new_with_constructor(
            overhead_histogram as fn() -> Histogram,
        );
        registry.register(
            "overhead_seconds",
            "Time to response headers spent in the proxy itself, upstream wait excluded",
            overhead.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being answered, streams included",
            requests_in_flight.clone(),
        );
        let streams_in_flight = Gauge::default();
        registry.register(
            "streams_in_flight",
            "Server-sent-event responses being forwarded",
            streams_in_flight.clone(),
        );
        let upstream_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Upstream exchanges that failed, by kind",
            upstream_failures.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "models_cache_hits",
            "GET /v1/models answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "models_cache_misses",
            "GET /v1/models that found no fresh entry",
            cache_misses.clone(),
        );
        let cache_fetches = Counter::default();
        registry.register(
            "models_cache_fetches",
            "Upstream fetches of the model list",
            cache_fetches.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens reported in upstream usage objects, by client and kind",
            tokens.clone(),
        );
        let key_requests = Family::<KeyLabels, Counter>::default();
        registry.register(
            "upstream_key_requests",
            "Upstream requests sent, by position of the key in AUTH_BEARER",
            key_requests.clone(),
        );
        let key_rate_limited = Family::<KeyLabels, Counter>::default();
        registry.register(
            "upstream_key_rate_limited",
            "Upstream 429 answers, by position of the key in AUTH_BEARER",
            key_rate_limited.clone(),
        );
        let key_resting = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "upstream_key_resting",
            "1 while the key rests after a 429, else 0",
            key_resting.clone(),
        );
        let key_disabled = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "upstream_key_disabled",
            "1 while the key is out of turn: the upstream refused a probe with the key alone (401)",
            key_disabled.clone(),
        );
        let key_probes = Family::<KeyProbeLabels, Counter>::default();
        registry.register(
            "upstream_key_probes",
            "Probes of one key alone, by position and outcome (accepted, refused, inconclusive)",
            key_probes.clone(),
        );
        let refusals_passed = Family::<PassedRefusalLabels, Counter>::default();
        registry.register(
            "upstream_refusals_passed",
            "Upstream 401, 403 and 429 answers a key pool passed on without resting or \
             disabling a key for them, by status",
            refusals_passed.clone(),
        );
        let limit_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by a client's limits, by client and reason",
            limit_refusals.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Reloads of the clients file and token settings, by result (ok, failed)",
            reloads.clone(),
        );
        let clients_file_missing = Gauge::default();
        registry.register(
            "clients_file_missing",
            "1 while the clients file (CLIENTS_FILE) cannot be read; the clients loaded before \
             stay in force",
            clients_file_missing.clone(),
        );
        let state_mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "shared_state_mode",
            "1 for the mode the shared state is in: shared (Redis) or local (this process)",
            state_mode.clone(),
        );
        let redis_failures = Family::<RedisFailureLabels, Counter>::default();
        registry.register(
            "redis_failures",
            "Redis calls that gave no answer, and drops of the signals connection, by kind (timeout, connection, error)",
            redis_failures.clone(),
        );
        let upstream_requests = Family::<UpstreamClassLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Attempts sent to each upstream, by the class of their answer (2xx to 5xx) or how they \
             failed (connect, timeout)",
            upstream_requests.clone(),
        );
        let upstream_head = Family::<UpstreamLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_head_seconds",
            "Time from sending an attempt to the upstream's response head, by upstream",
            upstream_head.clone(),
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        registry.register(
            "failovers",
            "Requests that left an upstream for another, by the upstream left and why",
            failovers.clone(),
        );
        let breaker_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_breaker_state",
            "Each upstream's breaker: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let attempts = Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]);
        registry.register(
            "upstream_attempts",
            "Attempts per forwarded request, across keys and upstreams",
            attempts.clone(),
        );
        let panic_routing = Family::<ModelLabels, Counter>::default();
        registry.register(
            "panic_routing",
            "Requests sent to upstreams whose breakers were all open, by model",
            panic_routing.clone(),
        );
        let spend = Family::<SpendLabels, DollarCounter>::default();
        registry.register(
            "spend_usd",
            "US dollars the answered requests cost, by client, upstream and model, from the usage \
             the upstream reported and the configured prices",
            spend.clone(),
        );
        let budgets = Family::<BudgetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "client_budget_usd",
            "The dollar budget of each client that has one, by client and period (day: \
             usd_per_day, month: usd_per_month), as the clients file in force says",
            budgets.clone(),
        );
        let unpriced = Family::<UpstreamModelLabels, Counter>::default();
        registry.register(
            "unpriced_requests",
            "Requests served with usage for a model that has no price, by upstream and model: \
             their cost is not in llm_proxy_spend_usd_total",
            unpriced.clone(),
        );
        let metrics = Metrics(Arc::new(Families {
            registry,
            requests,
            duration,
            time_to_first_byte,
            overhead,
            requests_in_flight,
            streams_in_flight,
            upstream_failures,
            cache_hits,
            cache_misses,
            cache_fetches,
            tokens,
            key_requests,
            key_rate_limited,
            key_resting,
            key_disabled,
            key_probes,
            refusals_passed,
            limit_refusals,
            reloads,
            clients_file_missing,
            state_mode,
            redis_failures,
            upstream_requests,
            upstream_head,
            failovers,
            breaker_state,
            attempts,
            panic_routing,
            spend,
            spend_handles: Default::default(),
            budgets,
            unpriced,
            activity: Activity::new(),
            cached: Default::default(),
        }));
        metrics.state_mode(StateMode::Local);
        metrics
    }

    /// The Prometheus text exposition (format 0.0.4) of every family.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        if let Err(err) = prometheus_text::encode(&mut text, &self.0.registry) {
            log::error!("encoding metrics failed: {err}");
        }
        text
    }

    pub fn record_request(
        &self,
        route: Route,
        method: &Method,
        status: StatusCode,
        duration: Duration,
        time_to_first_byte: Option<Duration>,
        overhead: Option<Duration>,
    ) {
        let families = &self.0;
        let labels = RequestLabels {
            route: route.label(),
            method: method_label(method),
            status_class: status_class(status),
        };
        families.requests.get_or_create(&labels).inc();
        if route.is_forwarded() {
            families.activity.record_request();
        }
        let handles = &families.cached[route.index()];
        let labels = RouteLabels {
            route: route.label(),
        };
        handles
            .duration
            .get_or_init(|| families.duration.get_or_create(&labels).clone())
            .observe(duration.as_secs_f64());
        if let Some(ttfb) = time_to_first_byte {
            handles
                .ttfb
                .get_or_init(|| families.time_to_first_byte.get_or_create(&labels).clone())
                .observe(ttfb.as_secs_f64());
        }
        if let Some(overhead) = overhead {
            handles
                .overhead
                .get_or_init(|| families.overhead.get_or_create(&labels).clone())
                .observe(overhead.as_secs_f64());
        }
    }

    /// The last hour minute by minute (requests, spend, refusals).
    pub fn activity(&self) -> &Activity {
        &self.0.activity
    }

    pub fn requests_in_flight(&self) -> &Gauge {
        &self.0.requests_in_flight
    }

    pub fn streams_in_flight(&self) -> &Gauge {
        &self.0.streams_in_flight
    }

    pub fn upstream_failure(&self, kind: UpstreamFailure) {
        self.0
            .upstream_failures
            .get_or_create(&FailureLabels { kind })
            .inc();
    }

    pub fn cache_hit(&self) {
        self.0.cache_hits.inc();
    }

    pub fn cache_miss(&self) {
        self.0.cache_misses.inc();
    }

    pub fn cache_fetch(&self) {
        self.0.cache_fetches.inc();
    }

    pub fn tokens(&self, client: &Arc<str>, kind: TokenKind, count: u64) {
        self.0
            .tokens
            .get_or_create(&TokenLabels {
                client: client.clone(),
                kind,
            })
            .inc_by(count);
    }
}

impl Metrics {
    /// The series of one upstream, looked up once: a family lookup per attempt would hash the
    /// labels under a lock.
    pub fn upstream_counters(&self, upstream: &Arc<str>) -> UpstreamCounters {
        let families = &self.0;
        let class = |class: &'static str| {
            families
                .upstream_requests
                .get_or_create(&UpstreamClassLabels {
                    upstream: upstream.clone(),
                    class,
                })
                .clone()
        };
        UpstreamCounters {
            classes: [
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
                class("connect"),
                class("timeout"),
            ],
            head: families
                .upstream_head
                .get_or_create(&UpstreamLabels {
                    upstream: upstream.clone(),
                })
                .clone(),
        }
    }

    /// A request left `upstream` for another because of `reason`.
    pub fn failover(&self, upstream: &Arc<str>, reason: String) {
        self.0
            .failovers
            .get_or_create(&FailoverLabels {
                upstream: upstream.clone(),
                reason,
            })
            .inc();
    }

    /// 0 closed, 1 half-open, 2 open.
    pub fn breaker_state(&self, upstream: &Arc<str>, state: i64) {
        self.0
            .breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: upstream.clone(),
            })
            .set(state);
    }

    pub fn attempts(&self, attempts: u32) {
        self.0.attempts.observe(f64::from(attempts));
    }

    /// `model`: a configured name or pattern, never a caller's free text.
    pub fn panic_routing(&self, model: Arc<str>) {
        self.0
            .panic_routing
            .get_or_create(&ModelLabels { model })
            .inc();
    }

    /// The per-key series of one pool: `upstream` names its upstream with an upstreams file.
    pub fn key_counters(&self, upstream: Option<Arc<str>>) -> KeyCounters {
        KeyCounters {
            metrics: self.clone(),
            upstream,
            requests: Arc::new([]),
        }
    }

    pub fn refusal_passed(&self, status: PassedRefusal) {
        self.0
            .refusals_passed
            .get_or_create(&PassedRefusalLabels { status })
            .inc();
    }
}

impl Metrics {
    pub fn state_mode(&self, mode: StateMode) {
        for each in [StateMode::Shared, StateMode::Local] {
            self.0
                .state_mode
                .get_or_create(&ModeLabels { mode: each })
                .set(i64::from(each == mode));
        }
    }

    pub fn redis_failure(&self, kind: RedisFailure) {
        self.0
            .redis_failures
            .get_or_create(&RedisFailureLabels { kind })
            .inc();
    }
}

/// The per-key series of one key pool. Cloning is shallow.
#[derive(Clone)]
pub struct KeyCounters {
    metrics: Metrics,
    upstream: Option<Arc<str>>,
    /// Each key's request counter once it has one (see [`KeyCounters::for_keys`]).
    requests: Arc<[OnceLock<Counter>]>,
}

impl KeyCounters {
    /// These series for a pool of `keys` keys: each key's request counter is looked up in its
    /// family once, at the key's first request (when its series appears, as it always did), and
    /// counted directly from then on: the family's lookup hashes the labels, the upstream's
    /// name among them, under a lock, for every request. A family never drops a series, so
    /// the counter kept is the one the family shows.
    pub fn for_keys(self, keys: usize) -> KeyCounters {
        KeyCounters {
            requests: (0..keys).map(|_| OnceLock::new()).collect(),
            ..self
        }
    }

    fn labels(&self, position: usize) -> KeyLabels {
        KeyLabels {
            upstream: self.upstream.clone(),
            key: position as u64,
        }
    }

    pub fn request(&self, position: usize) {
        let counter = || {
            self.metrics
                .0
                .key_requests
                .get_or_create(&self.labels(position))
                .clone()
        };
        match position
            .checked_sub(1)
            .and_then(|index| self.requests.get(index))
        {
            Some(kept) => kept.get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }

    pub fn rate_limited(&self, position: usize) {
        let families = &self.metrics.0;
        families
            .key_rate_limited
            .get_or_create(&self.labels(position))
            .inc();
    }

    pub fn probe(&self, position: usize, outcome: ProbeOutcome) {
        let families = &self.metrics.0;
        families
            .key_probes
            .get_or_create(&KeyProbeLabels {
                key: self.labels(position),
                outcome,
            })
            .inc();
    }

    pub fn state(&self, position: usize, state: KeyState) {
        let families = &self.metrics.0;
        let labels = self.labels(position);
        families
            .key_resting
            .get_or_create(&labels)
            .set(i64::from(state == KeyState::Resting));
        families
            .key_disabled
            .get_or_create(&labels)
            .set(i64::from(state == KeyState::Disabled));
    }
}

impl Metrics {
    /// Every refusal by a client's limits comes through here: the metric and the last hour's
    /// count by client and reason (`/admin/clients`) are kept together.
    pub fn limit_refusal(&self, client: &Arc<str>, reason: &'static str) {
        self.0.activity.record_refusal(client, reason);
        self.0
            .limit_refusals
            .get_or_create(&RefusalLabels {
                client: client.clone(),
                reason,
            })
            .inc();
    }

    /// A request `client` made cost `nanos` at `upstream`, served as `model` (a name from the
    /// files, never the caller's free text).
    pub fn spend(&self, client: &Arc<str>, upstream: &Arc<str>, model: &Arc<str>, nanos: Nanos) {
        let key = SpendKey(client, upstream, model);
        let mut handles = self.0.spend_handles.lock();
        if let Some(handle) = handles.get(&key) {
            handle.add(nanos);
            return;
        }
        let labels = SpendLabels {
            client: client.clone(),
            upstream: upstream.clone(),
            model: model.clone(),
        };
        let handle = self.0.spend.get_or_create(&labels).clone();
        handle.add(nanos);
        handles.insert(labels, handle);
    }

    /// The dollar budgets of the clients file in force, as (client, `day`|`month`, budget): the
    /// series of a client or budget no longer in the file go with it.
    pub fn client_budgets<'a>(
        &self,
        budgets: impl IntoIterator<Item = (&'a Arc<str>, &'static str, Nanos)>,
    ) {
        // Cleared and set again rather than diffed: a reload is rare and the list short.
        self.0.budgets.clear();
        for (client, period, nanos) in budgets {
            self.0
                .budgets
                .get_or_create(&BudgetLabels {
                    client: client.clone(),
                    period,
                })
                .set(usd(nanos));
        }
    }

    /// A request was served with usage for a model that has no price.
    pub fn unpriced(&self, upstream: &Arc<str>, model: &Arc<str>) {
        self.0
            .unpriced
            .get_or_create(&UpstreamModelLabels {
                upstream: upstream.clone(),
                model: model.clone(),
            })
            .inc();
    }

    pub fn reload(&self, succeeded: bool) {
        let result = if succeeded { "ok" } else { "failed" };
        self.0.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn clients_file_missing(&self, missing: bool) {
        self.0.clients_file_missing.set(i64::from(missing));
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_series_name_the_upstream_only_when_given_one() {
        let metrics = Metrics::new();
        let alone = metrics.key_counters(None);
        let named = metrics.key_counters(Some(Arc::from("azure-eu")));
        for counted in [&alone, &named] {
            counted.request(2);
            counted.probe(2, ProbeOutcome::Refused);
            counted.state(2, KeyState::Disabled);
        }
        let text = metrics.encode();
        for line in [
            "llm_proxy_upstream_key_requests_total{key=\"2\"} 1",
            "llm_proxy_upstream_key_requests_total{upstream=\"azure-eu\",key=\"2\"} 1",
            "llm_proxy_upstream_key_probes_total{key=\"2\",outcome=\"refused\"} 1",
            "llm_proxy_upstream_key_probes_total{upstream=\"azure-eu\",key=\"2\",outcome=\"refused\"} 1",
            "llm_proxy_upstream_key_disabled{key=\"2\"} 1",
            "llm_proxy_upstream_key_disabled{upstream=\"azure-eu\",key=\"2\"} 1",
            "llm_proxy_upstream_key_resting{upstream=\"azure-eu\",key=\"2\"} 0",
        ] {
            assert!(
                text.lines().any(|found| found == line),
                "{line} in:\n{text}"
            );
        }
        assert!(!text.contains("upstream=\"\""), "{text}");
    }

    #[test]
    fn spend_is_summed_in_nano_dollars_and_shown_in_dollars() {
        let metrics = Metrics::new();
        let (client, upstream, model) =
            (Arc::from("alice"), Arc::from("openai"), Arc::from("gpt-4o"));
        // A thousand requests of $0.000001050 each, and one of $0.000001: exactly $0.001051,
        // which a float sum of the dollar amounts would miss in its last digits.
        for _ in 0..1000 {
            metrics.spend(&client, &upstream, &model, 1_050);
        }
        // The same names in other `Arc`s (a reload's), and labels that differ in one place or
        // only in where one label ends and the next begins, each find their own series.
        metrics.spend(
            &Arc::from("alice"),
            &Arc::from("openai"),
            &Arc::from("gpt-4o"),
            1_000,
        );
        metrics.spend(&client, &upstream, &Arc::from("gpt-4o-mini"), 7);
        metrics.spend(&Arc::from("aliceo"), &Arc::from("penai"), &model, 9);
        metrics.unpriced(&upstream, &model);
        let text = metrics.encode();
        for line in [
            "# TYPE llm_proxy_spend_usd_total counter",
            "llm_proxy_spend_usd_total{client=\"alice\",upstream=\"openai\",model=\"gpt-4o\"} 0.001051",
            "llm_proxy_spend_usd_total{client=\"alice\",upstream=\"openai\",model=\"gpt-4o-mini\"} 7e-9",
            "llm_proxy_spend_usd_total{client=\"aliceo\",upstream=\"penai\",model=\"gpt-4o\"} 9e-9",
            "llm_proxy_unpriced_requests_total{upstream=\"openai\",model=\"gpt-4o\"} 1",
        ] {
            assert!(
                text.lines().any(|found| found == line),
                "{line} in:\n{text}"
            );
        }
    }
}
