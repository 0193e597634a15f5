//! Talking to the upstream: the `Upstream` handle (connection pool, base URL, credentials,
//! limits), the request it sends, the answer it shapes, and the body adapters on both paths.

pub mod body;
pub mod breaker;
pub mod choice;
pub mod clients;
pub mod headers;
pub mod keys;
pub mod models;
pub mod models_cache;
mod refusals;
pub mod rename;
pub mod request;
pub mod response;
pub mod router;
pub mod upgrade;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::Url;
use warp::http::{HeaderMap, HeaderName, Method, StatusCode, header};

use crate::auth::redact::{Redactor, error_chain, searchable};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;

use crate::config::{Config, NamedUpstream, UpstreamQuery};
use crate::error::{ErrorFormat, ProxyError};
use crate::ops::metrics::{
    AttemptClass, Metrics, PassedRefusal, UpstreamCounters, UpstreamFailure,
};
use crate::shared::Shared;
use crate::shared::rests::SharedRests;
use crate::shared::signals::Signals;
use crate::vocab::Endpoint;
use crate::vocab::descriptors::is_out_of_descriptors;
use crate::vocab::models::ModelPatterns;
use body::caused_by_body_limit;
use breaker::Breaker;
use clients::UpstreamClients;
use keys::{DEFAULT_REST, KEY_CHECK_PATH, KeyPool, Verdict, rest_duration, retry_after_secs};
use models_cache::ModelsCache;
use request::{BodyRules, CallerBody, RequestBody};

/// How long `/v1/models` answers are kept.
pub const MODELS_CACHE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Everything the upstream code needs, and nothing else. Cloning is shallow.
#[derive(Clone)]
pub struct Upstream(Arc<Inner>);

struct Inner {
    /// The upstreams file's name for it; `default` for the environment's one upstream.
    name: Arc<str>,
    tier: u32,
    weight: u32,
    models: ModelPatterns,
    /// Our model name -> this upstream's.
    model_names: BTreeMap<String, String>,
    /// Its settings as configured, to tell an unchanged upstream on reload.
    configured: NamedUpstream,
    breaker: Arc<Breaker>,
    /// Requests sent to it whose answer is still coming.
    in_flight: AtomicUsize,
    last_failure: parking_lot::Mutex<Option<Failure>>,
    /// Its own series of the upstream metrics.
    counted: UpstreamCounters,
    /// Its `/v1/models` answer, fetched once per TTL.
    models_cache: ModelsCache,
    /// Its last model list that could be read, for a merged list when it is slow or down.
    last_models: parking_lot::Mutex<Option<Arc<Vec<serde_json::Value>>>>,
    /// Taken in turn (`next_client`): one HTTP/2 connection each to an upstream that offers it.
    clients: Vec<reqwest::Client>,
    next_client: std::sync::atomic::AtomicUsize,
    tunnel_client: clients::TunnelClient,
    /// What the caller's `/v1` stands for upstream.
    base_url: Url,
    known_paths: request::KnownPaths,
    query: Option<UpstreamQuery>,
    keys: Arc<KeyPool>,
    /// `UPSTREAM_AUTH_HEADER`: where the key goes.
    key_header: HeaderName,
    /// Every upstream key as searched for in answers (short ones are not searched for).
    keys_to_mask: Vec<Bytes>,
    /// The callers' token header, never forwarded.
    caller_token_header: HeaderName,
    /// How long an attempt waits for the answer's head (`timeout_secs`).
    head_timeout: Duration,
    /// `UPSTREAM_TIMEOUT_SECS`: how long the caller's body may take to arrive.
    body_deadline: Duration,
    stream_idle_timeout: Duration,
    sse_keepalive: Option<Duration>,
    max_body_bytes: u64,
    metrics: Metrics,
    redactor: Arc<Redactor>,
    /// `DEBUG_MODE`: bodies are logged, secrets masked.
    log_bodies: bool,
    /// `ERROR_FORMAT`: for the answers and stream-failure events written here.
    error_format: ErrorFormat,
}

impl Upstream {
    /// The upstream `named` configures. With `shared` configured, the key rests are shared
    /// through Redis, and announced to the other replicas (and heard from them) through
    /// `signals`.
    pub fn new(
        config: &Config,
        named: &NamedUpstream,
        clients: UpstreamClients,
        metrics: Metrics,
        redactor: Arc<Redactor>,
        shared: &Shared,
        signals: &Signals,
    ) -> Upstream {
        let upstream = &named.settings;
        let from_file = config.upstreams.file.is_some();
        // With a file, each upstream has a pool of its own whose positions start at 1 again:
        // its series carry its name. Without one they stay as they always were.
        let counted_keys = metrics.key_counters(from_file.then(|| named.name.clone()));
        let mut keys = KeyPool::new(&upstream.keys, counted_keys);
        if from_file {
            keys = keys.resting_alone();
        }
        let keys = Arc::new(keys);
        if shared.is_configured() {
            keys::share_rests(
                &keys,
                SharedRests::new(shared.clone(), &upstream.keys),
                signals,
            );
        }
        Upstream(Arc::new(Inner {
            name: named.name.clone(),
            tier: named.tier,
            weight: named.weight,
            models: named.models.clone(),
            model_names: named.model_names.clone(),
            configured: named.clone(),
            breaker: Arc::new(Breaker::new()),
            in_flight: AtomicUsize::new(0),
            last_failure: parking_lot::Mutex::new(None),
            counted: metrics.upstream_counters(&named.name),
            models_cache: ModelsCache::new(MODELS_CACHE_TTL),
            last_models: parking_lot::Mutex::new(None),
            clients: clients.pools,
            next_client: std::sync::atomic::AtomicUsize::new(0),
            tunnel_client: clients.tunnel,
            base_url: upstream.base_url.clone(),
            known_paths: request::KnownPaths::new(&upstream.base_url),
            query: upstream.query.clone(),
            keys,
            key_header: upstream.auth_header.clone(),
            keys_to_mask: upstream
                .keys
                .iter()
                .map(|key| searchable(&key.key))
                .filter(|key| !key.is_empty())
                .collect(),
            caller_token_header: config.auth_header.clone(),
            head_timeout: named.timeout,
            body_deadline: config.limits.upstream_timeout,
            stream_idle_timeout: config.limits.stream_idle_timeout,
            sse_keepalive: config.limits.sse_keepalive,
            max_body_bytes: config.limits.max_body_bytes,
            metrics,
            redactor,
            log_bodies: config.debug_mode,
            error_format: config.error_format,
        }))
    }

    pub fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    pub fn breaker(&self) -> &Breaker {
        &self.0.breaker
    }

    pub fn tier(&self) -> u32 {
        self.0.tier
    }

    pub fn weight(&self) -> u32 {
        self.0.weight
    }

    pub fn models(&self) -> &ModelPatterns {
        &self.0.models
    }

    /// What this upstream calls `model`.
    pub fn upstream_name<'a>(&'a self, model: &'a str) -> &'a str {
        self.0.model_names.get(model).map_or(model, String::as_str)
    }

    /// Our name for what this upstream calls `model` (its model list renamed back).
    pub fn our_name<'a>(&'a self, model: &'a str) -> &'a str {
        self.0
            .model_names
            .iter()
            .find(|(_, theirs)| theirs.as_str() == model)
            .map_or(model, |(ours, _)| ours.as_str())
    }

    /// Whether one of its keys may be used now (none rests, or one's rest is over).
    pub fn has_usable_key(&self, now: tokio::time::Instant) -> bool {
        self.0.keys.is_empty() || self.0.keys.usable_at(now)
    }

    /// Its cached `/v1/models` answer.
    pub fn models_cache(&self) -> &ModelsCache {
        &self.0.models_cache
    }

    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn last_failure(&self) -> Option<Failure> {
        *self.0.last_failure.lock()
    }

    /// Whether `named` configures this upstream exactly as it is (a reload keeps it whole).
    pub fn is_configured_as(&self, named: &NamedUpstream) -> bool {
        self.0.configured == *named
    }

    /// Whether this upstream was built with the connection settings `named` asks for, so that
    /// its pools can serve a rebuilt one.
    pub fn connects_as(&self, named: &NamedUpstream) -> bool {
        self.0.configured.settings.connection == named.settings.connection
    }

    /// Its connection pools, for a rebuilt upstream with the same connection settings.
    pub fn clients(&self) -> UpstreamClients {
        UpstreamClients {
            pools: self.0.clients.clone(),
            tunnel: self.0.tunnel_client.clone(),
        }
    }

    /// A freshly built upstream that goes on with `other`'s breaker and last failure: the same
    /// place under new keys or settings.
    pub fn with_health_of(self, other: &Upstream) -> Upstream {
        match Arc::try_unwrap(self.0) {
            Ok(mut inner) => {
                inner.breaker = other.0.breaker.clone();
                *inner.last_failure.get_mut() = other.last_failure();
                Upstream(Arc::new(inner))
            }
            Err(shared) => Upstream(shared),
        }
    }

    fn keys_to_mask(&self) -> &[Bytes] {
        &self.0.keys_to_mask
    }

    /// The pool of upstream keys, for readiness and metrics.
    pub fn keys(&self) -> &KeyPool {
        &self.0.keys
    }

    /// The next connection pool in turn.
    pub(crate) fn client(&self) -> &reqwest::Client {
        let clients = &self.0.clients;
        if clients.len() == 1 {
            return &clients[0];
        }
        let turn = self
            .0
            .next_client
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &clients[turn % clients.len()]
    }

    /// The upstream URL for a request classified as `endpoint`, forwarded under `path`.
    fn url(&self, endpoint: &Endpoint, path: &str, query: Option<&str>) -> Result<Url, ProxyError> {
        self.0.known_paths.upstream_url(
            &self.0.base_url,
            endpoint,
            path,
            query,
            self.0.query.as_ref(),
        )
    }

    fn body_log(&self) -> Option<Arc<Redactor>> {
        self.0.log_bodies.then(|| self.0.redactor.clone())
    }

    /// `MAX_BODY_BYTES` and `UPSTREAM_TIMEOUT_SECS`, the one cap and deadline of every caller's
    /// body, however it is read.
    fn body_rules(&self) -> BodyRules {
        BodyRules {
            max_bytes: self.0.max_body_bytes,
            deadline: self.0.body_deadline,
            log: self.body_log(),
        }
    }

    /// The caller's whole body, for the policy to read the model and size of (see
    /// [`CallerBody`]: the same bytes are then sent upstream, read once).
    pub async fn read_whole(&self, body: &mut CallerBody) -> Result<Bytes, ProxyError> {
        body.whole(&self.body_rules()).await
    }

    /// Sends the request with the next key in turn, and says what this upstream made of it.
    ///
    /// A 429 (the key rests) is tried again on the next usable key (each key at most once), as
    /// long as the body can be sent again and the request's attempts last; so is a connection
    /// that failed before anything was sent, when no other upstream could take the request.
    /// Nothing has reached the caller yet, since only status and headers have been seen.
    ///
    /// Refusals that may belong to the request never take a key away from the other callers: a
    /// 403 and a 429 for a request larger than the limit itself go to the caller as they came,
    /// and a 401 only makes the key suspect (probed alone, see [`refusals`]) and lets the request
    /// try one other key.
    pub(crate) async fn send_with_keys(
        &self,
        client: &reqwest::Client,
        method: &Method,
        url: Url,
        headers: HeaderMap,
        body: &mut RequestBody,
        budget: &mut Budget<'_>,
    ) -> Attempted {
        let pool = &self.0.keys;
        if pool.is_empty() {
            return self
                .send_keyless(client, method, url, headers, body, budget)
                .await;
        }
        let mut tried = Vec::with_capacity(pool.len());
        let mut last_answer: Option<reqwest::Response> = None;
        let mut last_failure: Option<ProxyError> = None;
        let mut unauthorized = false;
        // Moved into the attempt that can be the last (every key tried, or a body that cannot be
        // sent twice), cloned for the others: a single key, the usual case, copies nothing.
        let (mut headers, mut url) = (Some(headers), Some(url));
        while budget.left != Some(0)
            && let Some(key) = pool.choose(&tried)
        {
            tried.push(key.position);
            let last = tried.len() == pool.len() || !body.replayable() || budget.left == Some(1);
            let (Some(mut attempt_headers), Some(attempt_url)) = (
                take_or_clone(&mut headers, last),
                take_or_clone(&mut url, last),
            ) else {
                break;
            };
            let Ok(attempt_body) = body.attempt() else {
                break;
            };
            attempt_headers.insert(&self.0.key_header, key.header_value);
            budget.spend();
            let response = match self
                .send_with(
                    client,
                    method.clone(),
                    attempt_url,
                    attempt_headers,
                    attempt_body,
                    budget.head_timeout(self.0.head_timeout),
                )
                .await
            {
                Ok(response) => response,
                // Another key cannot mend a connection; only without another upstream to go
                // to is it worth the next key's try (the connection may be new by then).
                Err(failure) if failure.nothing_sent && body.replayable() && !budget.others => {
                    log::info!(
                        "upstream {} connection failed with key {} of {}; trying the next key",
                        self.0.name,
                        key.position,
                        pool.len()
                    );
                    last_failure = Some(failure.error);
                    continue;
                }
                Err(failure) => return failure.into(),
            };
            // A pool of one key keeps the behaviour without a pool: every answer is the answer.
            let verdict = match Verdict::of(response.status()) {
                Verdict::RateLimited if pool.rests() => Verdict::RateLimited,
                _ if !pool.fails_over() => Verdict::Answer,
                verdict => verdict,
            };
            let response = match verdict {
                Verdict::Answer => return budget.judge(response),
                Verdict::Forbidden => {
                    log::info!(
                        "upstream {} answered 403 with key {} of {}: passed to the client, no key \
                         changes (a 403 belongs to the request)",
                        self.0.name,
                        key.position,
                        pool.len()
                    );
                    self.0.metrics.refusal_passed(PassedRefusal::Forbidden);
                    return Attempted::Answer(response);
                }
                Verdict::RateLimited => {
                    let (response, too_large) = self.too_large_for_any_key(response).await;
                    if too_large {
                        log::info!(
                            "upstream {} answered 429 with key {} of {} to a request larger than \
                             the limit itself: passed to the client, no key rests",
                            self.0.name,
                            key.position,
                            pool.len()
                        );
                        self.0.metrics.refusal_passed(PassedRefusal::TooLarge);
                        return Attempted::Answer(response);
                    }
                    let rest = rest_duration(response.headers(), SystemTime::now())
                        .unwrap_or(DEFAULT_REST);
                    let until = tokio::time::Instant::now() + rest;
                    if pool.rested(key.position, until) {
                        log::info!(
                            "upstream {} key {} of {} is rate-limited (429): resting {:.1}s",
                            self.0.name,
                            key.position,
                            pool.len(),
                            rest.as_secs_f64()
                        );
                    }
                    response
                }
                Verdict::Unauthorized => {
                    let probing = self.suspect(key.position);
                    let retry = !unauthorized && body.replayable() && budget.left != Some(0);
                    log::info!(
                        "upstream {} key {} of {} answered 401: {}{}",
                        self.0.name,
                        key.position,
                        pool.len(),
                        if probing {
                            format!("probing it alone (GET {KEY_CHECK_PATH}); ")
                        } else {
                            String::new()
                        },
                        if retry {
                            "the request tries one other key"
                        } else {
                            "passed to the client"
                        }
                    );
                    if !retry {
                        self.0.metrics.refusal_passed(PassedRefusal::Unauthorized);
                        return Attempted::Answer(response);
                    }
                    unauthorized = true;
                    response
                }
            };
            if !body.replayable() {
                return self.judge_with_keys(budget, response);
            }
            last_answer = Some(response);
        }
        let first_usable = pool.first_usable_at();
        let resting_until = first_usable.filter(|at| *at > tokio::time::Instant::now());
        match (last_answer, last_failure) {
            (Some(mut answer), _) => {
                // Every key has been tried or rests: the caller gets the upstream's last word, and
                // when it was a rate limit and the keys rest, when to come back.
                if answer.status() == StatusCode::TOO_MANY_REQUESTS
                    && let Some(at) = resting_until
                {
                    answer
                        .headers_mut()
                        .insert(header::RETRY_AFTER, retry_after_secs(at).into());
                }
                if answer.status() == StatusCode::UNAUTHORIZED && pool.fails_over() {
                    self.0.metrics.refusal_passed(PassedRefusal::Unauthorized);
                }
                self.judge_with_keys(budget, answer)
            }
            (None, Some(error)) => Attempted::Failed(Failed {
                reason: Failure::Connect,
                answer: None,
                error,
            }),
            // No key could be asked. `first_usable` rather than `resting_until`: a rest that ended
            // a moment ago still means "come back", not "every key was refused".
            (None, None) => Attempted::Unavailable(match first_usable {
                Some(at) => ProxyError::KeysResting {
                    retry_after: retry_after_secs(at),
                },
                None => ProxyError::KeysRefused,
            }),
        }
    }

    /// The pool's last answer: [`Budget::judge`], except that a 429 while another of its keys
    /// may still be used is that key's limit, not this upstream failing (the request stopped
    /// here because its attempts ran out or its body cannot be sent again). It goes to the
    /// caller as it came, and the breaker does not count it: otherwise a few keys at their
    /// limits would open the breaker of an upstream whose other keys serve.
    fn judge_with_keys(&self, budget: &Budget<'_>, answer: reqwest::Response) -> Attempted {
        if answer.status() == StatusCode::TOO_MANY_REQUESTS
            && self.0.keys.usable_at(tokio::time::Instant::now())
        {
            return Attempted::Answer(answer);
        }
        budget.judge(answer)
    }

    /// An upstream without keys (a local server): one attempt, with no credential.
    async fn send_keyless(
        &self,
        client: &reqwest::Client,
        method: &Method,
        url: Url,
        headers: HeaderMap,
        body: &mut RequestBody,
        budget: &mut Budget<'_>,
    ) -> Attempted {
        let Ok(attempt_body) = body.attempt() else {
            return Attempted::Stop(ProxyError::BadGateway);
        };
        budget.spend();
        let timeout = budget.head_timeout(self.0.head_timeout);
        match self
            .send_with(client, method.clone(), url, headers, attempt_body, timeout)
            .await
        {
            Ok(response) => budget.judge(response),
            Err(failure) => failure.into(),
        }
    }

    /// The request sent to this upstream alone, as before there were several: every answer is
    /// the caller's, and only a failure with none is an error.
    pub(crate) async fn send_alone(
        &self,
        client: &reqwest::Client,
        method: &Method,
        url: Url,
        headers: HeaderMap,
        mut body: RequestBody,
    ) -> Result<reqwest::Response, ProxyError> {
        let mut budget = Budget::alone();
        match self
            .send_with_keys(client, method, url, headers, &mut body, &mut budget)
            .await
        {
            Attempted::Answer(answer)
            | Attempted::Failed(Failed {
                answer: Some(answer),
                ..
            }) => Ok(answer),
            Attempted::Failed(Failed { error, .. })
            | Attempted::Unavailable(error)
            | Attempted::Stop(error) => Err(error),
        }
    }

    /// Sends one request upstream on `client` and waits for its response headers.
    async fn send_with(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<reqwest::Body>,
        timeout: Duration,
    ) -> Result<reqwest::Response, SendFailure> {
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "upstream {} request: {method} {} headers: {}",
                self.0.name,
                url.path(),
                self.0.redactor.describe_headers(&headers)
            );
        }
        let metrics = &self.0.metrics;
        let counted = &self.0.counted;
        // The request is built whole and the header map moved in: `RequestBuilder::headers`
        // would re-insert every header, one by one, into the builder's own empty map.
        let mut request = reqwest::Request::new(method, url);
        *request.headers_mut() = headers;
        *request.body_mut() = body;
        let asked = std::time::Instant::now();
        match tokio::time::timeout(timeout, client.execute(request)).await {
            Err(_) => {
                log::error!(
                    "upstream {} sent no response headers within {:.1}s",
                    self.0.name,
                    timeout.as_secs_f64()
                );
                metrics.upstream_failure(UpstreamFailure::Timeout);
                counted.request(AttemptClass::Timeout);
                Err(SendFailure {
                    error: ProxyError::GatewayTimeout,
                    nothing_sent: false,
                    failover: Some(Failure::Timeout),
                })
            }
            Ok(Err(err)) if caused_by_body_limit(&err) => {
                log::info!("request body over MAX_BODY_BYTES: upstream request aborted");
                Err(ProxyError::PayloadTooLarge.into())
            }
            Ok(Err(err)) if is_out_of_descriptors(&err) => {
                log::error!(
                    "cannot open an upstream connection: this process is out of file descriptors \
                     (a local resource limit, not an upstream failure); answering 503"
                );
                metrics.upstream_failure(UpstreamFailure::LocalLimit);
                Err(ProxyError::Overloaded.into())
            }
            Ok(Err(err)) => {
                log::error!(
                    "upstream {} request failed: {}",
                    self.0.name,
                    error_chain(&err)
                );
                let (kind, error, failover) = if err.is_timeout() {
                    (
                        UpstreamFailure::Timeout,
                        ProxyError::GatewayTimeout,
                        Some(Failure::Timeout),
                    )
                } else if err.is_connect() {
                    (
                        UpstreamFailure::Connect,
                        ProxyError::BadGateway,
                        Some(Failure::Connect),
                    )
                } else {
                    // The request may have reached the upstream: sending it elsewhere could
                    // run it twice.
                    (UpstreamFailure::Reset, ProxyError::BadGateway, None)
                };
                metrics.upstream_failure(kind);
                counted.request(match failover {
                    Some(Failure::Timeout) => AttemptClass::Timeout,
                    _ => AttemptClass::Connect,
                });
                Err(SendFailure {
                    error,
                    // A connection that was never established carried nothing of the request.
                    nothing_sent: err.is_connect(),
                    failover,
                })
            }
            Ok(Ok(response)) => {
                let status = response.status();
                self.record_status(status);
                counted.answered(status, asked.elapsed());
                Ok(response)
            }
        }
    }

    /// Counts upstream answers that are errors.
    fn record_status(&self, status: StatusCode) {
        if status.is_server_error() {
            self.0.metrics.upstream_failure(UpstreamFailure::Status5xx);
        } else if status.is_client_error() {
            self.0.metrics.upstream_failure(UpstreamFailure::Status4xx);
        }
    }
}

/// The value itself for the last use, a copy before that.
fn take_or_clone<T: Clone>(slot: &mut Option<T>, last: bool) -> Option<T> {
    if last { slot.take() } else { slot.clone() }
}

/// Why one upstream attempt failed, whether the upstream can have seen any of it, and whether
/// another upstream may be asked instead.
struct SendFailure {
    error: ProxyError,
    nothing_sent: bool,
    failover: Option<Failure>,
}

impl From<ProxyError> for SendFailure {
    fn from(error: ProxyError) -> SendFailure {
        SendFailure {
            error,
            nothing_sent: false,
            failover: None,
        }
    }
}

/// A failed send is the upstream's failure when another upstream may be asked instead, else the
/// end of the request.
impl From<SendFailure> for Attempted {
    fn from(failure: SendFailure) -> Attempted {
        match failure.failover {
            Some(reason) => Attempted::Failed(Failed {
                reason,
                answer: None,
                error: failure.error,
            }),
            None => Attempted::Stop(failure.error),
        }
    }
}

/// What one upstream made of a request.
pub(crate) enum Attempted {
    /// An answer for the caller: once its head is forwarded, the request is committed.
    Answer(reqwest::Response),
    /// The upstream failed it in a way another upstream may not.
    Failed(Failed),
    /// The upstream had no key to ask with; nothing was sent.
    Unavailable(ProxyError),
    /// The request cannot be sent anywhere else (its own fault, or it may have reached the
    /// upstream).
    Stop(ProxyError),
}

pub(crate) struct Failed {
    pub reason: Failure,
    /// The upstream's last answer, which the caller gets when no other upstream does better.
    pub answer: Option<reqwest::Response>,
    /// What the caller gets when there is no answer.
    pub error: ProxyError,
}

/// Why the request left an upstream: the failover reason of metrics and the access line, and
/// the kind of `last_failure` in `/admin/upstreams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    Status(StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect => f.write_str("connect"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Status(status) => write!(f, "status_{}", status.as_u16()),
        }
    }
}

/// One request's attempts across keys and upstreams: how many are left, by when the last must
/// have its answer, which statuses send it on, and whether another upstream is left to ask.
pub(crate) struct Budget<'a> {
    /// `None`: no limit (the environment's one upstream: each key once, as before).
    pub left: Option<u32>,
    pub spent: u32,
    pub deadline: Option<tokio::time::Instant>,
    pub failover_on: &'a [StatusCode],
    pub others: bool,
}

impl Budget<'static> {
    /// An upstream asked alone (the model list fetch): every key once, no deadline of its own.
    pub fn alone() -> Budget<'static> {
        Budget {
            left: None,
            spent: 0,
            deadline: None,
            failover_on: &[],
            others: false,
        }
    }
}

impl Budget<'_> {
    fn spend(&mut self) {
        self.spent += 1;
        if let Some(left) = &mut self.left {
            *left = left.saturating_sub(1);
        }
    }

    /// The upstream's own head timeout, never past the request's deadline.
    fn head_timeout(&self, upstream: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => {
                upstream.min(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            None => upstream,
        }
    }

    /// An answer in `failover_on` is this upstream's failure; any other is the caller's answer.
    fn judge(&self, answer: reqwest::Response) -> Attempted {
        let status = answer.status();
        if self.failover_on.contains(&status) {
            Attempted::Failed(Failed {
                reason: Failure::Status(status),
                answer: Some(answer),
                error: ProxyError::BadGateway,
            })
        } else {
            Attempted::Answer(answer)
        }
    }
}
