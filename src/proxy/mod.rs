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
pub mod upgrade;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::Url;
use warp::http::{HeaderMap, HeaderName, Method, StatusCode, header};

use crate::auth::redact::{Redactor, error_chain, searchable};
use crate::config::{Config, UpstreamQuery};
use crate::error::{ErrorFormat, ProxyError};
use crate::ops::metrics::{Metrics, PassedRefusal, UpstreamFailure};
use crate::shared::Shared;
use crate::shared::rests::SharedRests;
use crate::shared::signals::Signals;
use crate::vocab::Endpoint;
use crate::vocab::descriptors::is_out_of_descriptors;
use body::caused_by_body_limit;
use clients::UpstreamClients;
use keys::{DEFAULT_REST, KEY_CHECK_PATH, KeyPool, Verdict, rest_duration, retry_after_secs};
use request::{BodyRules, CallerBody, RequestBody};

/// Everything the upstream code needs, and nothing else. Cloning is shallow.
#[derive(Clone)]
pub struct Upstream(Arc<Inner>);

struct Inner {
    /// Taken in turn (`next_client`): one HTTP/2 connection each to an upstream that offers it.
    clients: Vec<reqwest::Client>,
    next_client: std::sync::atomic::AtomicUsize,
    tunnel_client: reqwest::Client,
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
    upstream_timeout: Duration,
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
    /// With `shared` configured, the key rests are shared through Redis, and announced to the
    /// other replicas (and heard from them) through `signals`.
    pub fn new(
        config: &Config,
        clients: UpstreamClients,
        metrics: Metrics,
        redactor: Arc<Redactor>,
        shared: &Shared,
        signals: &Signals,
    ) -> Upstream {
        let upstream = &config.upstream;
        let keys = Arc::new(KeyPool::new(&upstream.keys, metrics.clone()));
        if shared.is_configured() {
            keys::share_rests(
                &keys,
                SharedRests::new(shared.clone(), &upstream.keys),
                signals,
            );
        }
        Upstream(Arc::new(Inner {
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
            upstream_timeout: config.limits.upstream_timeout,
            stream_idle_timeout: config.limits.stream_idle_timeout,
            sse_keepalive: config.limits.sse_keepalive,
            max_body_bytes: config.limits.max_body_bytes,
            metrics,
            redactor,
            log_bodies: config.debug_mode,
            error_format: config.error_format,
        }))
    }

    fn keys_to_mask(&self) -> &[Bytes] {
        &self.0.keys_to_mask
    }

    /// The pool of upstream keys, for readiness and metrics.
    pub fn keys(&self) -> &KeyPool {
        &self.0.keys
    }

    /// The next connection pool in turn.
    fn client(&self) -> &reqwest::Client {
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
            deadline: self.0.upstream_timeout,
            log: self.body_log(),
        }
    }

    /// The caller's whole body, for the policy to read the model and size of (see
    /// [`CallerBody`]: the same bytes are then sent upstream, read once).
    pub async fn read_whole(&self, body: &mut CallerBody) -> Result<Bytes, ProxyError> {
        body.whole(&self.body_rules()).await
    }

    /// Sends the caller's request upstream with the key swapped in, and waits for the answer's
    /// headers. `path` is the one `endpoint` gives: the canonical path.
    pub async fn forward(
        &self,
        headers: HeaderMap,
        method: Method,
        endpoint: &Endpoint,
        path: &str,
        query: Option<&str>,
        body: CallerBody,
    ) -> Result<reqwest::Response, ProxyError> {
        let url = self.url(endpoint, path, query)?;
        // With more than one key, a body not read yet is read now (up to `REPLAYABLE_BODY`) so
        // that a refused attempt can be sent again; with one there is no other key to retry on,
        // so the body streams on as it arrives.
        let body = body
            .for_attempts(&self.body_rules(), self.0.keys.len() > 1)
            .await?;
        let headers =
            headers::request_headers(headers, &self.0.caller_token_header, &self.0.key_header);
        self.send_with_keys(self.client(), method, url, headers, body)
            .await
    }

    /// Sends the request with the next key in turn. A 429 (the key rests) or a connection that
    /// failed before anything was sent is tried again on the next usable key (each key at most
    /// once), as long as the body can be sent again; nothing has reached the caller yet, since
    /// only status and headers have been seen.
    ///
    /// Refusals that may belong to the request never take a key away from the other callers: a
    /// 403 and a 429 for a request larger than the limit itself go to the caller as they came,
    /// and a 401 only makes the key suspect (probed alone, see [`refusals`]) and lets the request
    /// try one other key.
    async fn send_with_keys(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: Url,
        headers: HeaderMap,
        mut body: RequestBody,
    ) -> Result<reqwest::Response, ProxyError> {
        let pool = &self.0.keys;
        let mut tried = Vec::with_capacity(pool.len());
        let mut last_answer: Option<reqwest::Response> = None;
        let mut last_failure: Option<ProxyError> = None;
        let mut unauthorized = false;
        // Moved into the attempt that can be the last (every key tried, or a body that cannot be
        // sent twice), cloned for the others: a single key, the usual case, copies nothing.
        let (mut headers, mut url) = (Some(headers), Some(url));
        while let Some(key) = pool.choose(&tried) {
            tried.push(key.position);
            let last = tried.len() == pool.len() || !body.replayable();
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
            let response = match self
                .send_with(
                    client,
                    method.clone(),
                    attempt_url,
                    attempt_headers,
                    attempt_body,
                )
                .await
            {
                Ok(response) => response,
                Err(failure) if failure.nothing_sent && body.replayable() => {
                    log::info!(
                        "upstream connection failed with key {} of {}; trying the next key",
                        key.position,
                        pool.len()
                    );
                    last_failure = Some(failure.error);
                    continue;
                }
                Err(failure) => return Err(failure.error),
            };
            // A pool of one key keeps the behaviour without a pool: every answer is the answer.
            let verdict = match Verdict::of(response.status()) {
                _ if !pool.fails_over() => Verdict::Answer,
                verdict => verdict,
            };
            let response = match verdict {
                Verdict::Answer => return Ok(response),
                Verdict::Forbidden => {
                    log::info!(
                        "upstream answered 403 with key {} of {}: passed to the client, no key                          changes (a 403 belongs to the request)",
                        key.position,
                        pool.len()
                    );
                    self.0.metrics.refusal_passed(PassedRefusal::Forbidden);
                    return Ok(response);
                }
                Verdict::RateLimited => {
                    let (response, too_large) = self.too_large_for_any_key(response).await;
                    if too_large {
                        log::info!(
                            "upstream answered 429 with key {} of {} to a request larger than the                              limit itself: passed to the client, no key rests",
                            key.position,
                            pool.len()
                        );
                        self.0.metrics.refusal_passed(PassedRefusal::TooLarge);
                        return Ok(response);
                    }
                    let rest = rest_duration(response.headers(), SystemTime::now())
                        .unwrap_or(DEFAULT_REST);
                    let until = tokio::time::Instant::now() + rest;
                    if pool.rested(key.position, until) {
                        log::info!(
                            "upstream key {} of {} is rate-limited (429): resting {:.1}s",
                            key.position,
                            pool.len(),
                            rest.as_secs_f64()
                        );
                    }
                    response
                }
                Verdict::Unauthorized => {
                    let probing = self.suspect(key.position);
                    let retry = !unauthorized && body.replayable();
                    log::info!(
                        "upstream key {} of {} answered 401: {}{}",
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
                        return Ok(response);
                    }
                    unauthorized = true;
                    response
                }
            };
            if !body.replayable() {
                return Ok(response);
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
                Ok(answer)
            }
            (None, Some(error)) => Err(error),
            // No key could be asked. `first_usable` rather than `resting_until`: a rest that ended
            // a moment ago still means "come back", not "every key was refused".
            (None, None) => match first_usable {
                Some(at) => Err(ProxyError::KeysResting {
                    retry_after: retry_after_secs(at),
                }),
                None => Err(ProxyError::KeysRefused),
            },
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
    ) -> Result<reqwest::Response, SendFailure> {
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "upstream request: {method} {} headers: {}",
                url.path(),
                self.0.redactor.describe_headers(&headers)
            );
        }
        let timeout = self.0.upstream_timeout;
        let metrics = &self.0.metrics;
        let mut request = client.request(method, url).headers(headers);
        if let Some(body) = body {
            request = request.body(body);
        }
        match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => {
                log::error!(
                    "upstream sent no response headers within {}s (UPSTREAM_TIMEOUT_SECS)",
                    timeout.as_secs()
                );
                metrics.upstream_failure(UpstreamFailure::Timeout);
                Err(ProxyError::GatewayTimeout.into())
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
                log::error!("upstream request failed: {}", error_chain(&err));
                let (kind, error) = if err.is_timeout() {
                    (UpstreamFailure::Timeout, ProxyError::GatewayTimeout)
                } else if err.is_connect() {
                    (UpstreamFailure::Connect, ProxyError::BadGateway)
                } else {
                    (UpstreamFailure::Reset, ProxyError::BadGateway)
                };
                metrics.upstream_failure(kind);
                Err(SendFailure {
                    error,
                    // A connection that was never established carried nothing of the request.
                    nothing_sent: err.is_connect(),
                })
            }
            Ok(Ok(response)) => {
                self.record_status(response.status());
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

/// Why one upstream attempt failed, and whether the upstream can have seen any of it.
struct SendFailure {
    error: ProxyError,
    nothing_sent: bool,
}

impl From<ProxyError> for SendFailure {
    fn from(error: ProxyError) -> SendFailure {
        SendFailure {
            error,
            nothing_sent: false,
        }
    }
}
