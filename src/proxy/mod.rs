//! Talking to the upstream: the `Upstream` handle (connection pool, base URL, credentials,
//! limits), the request it sends, the answer it shapes, and the body adapters on both paths.

pub mod body;
pub mod headers;
pub mod models;
pub mod models_cache;
pub mod request;
pub mod response;
pub mod upgrade;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use reqwest::Url;
use warp::Buf;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::auth::redact::{Redactor, error_chain, searchable};
use crate::config::Config;
use crate::error::ProxyError;
use crate::ops::metrics::{Metrics, UpstreamFailure};
use crate::server::descriptors::is_out_of_descriptors;
use body::caused_by_body_limit;

/// Everything the upstream code needs, and nothing else. Cloning is shallow.
#[derive(Clone)]
pub struct Upstream(Arc<Inner>);

struct Inner {
    client: reqwest::Client,
    tunnel_client: reqwest::Client,
    base_url: Url,
    authorization: HeaderValue,
    /// The upstream key as searched for in answers (empty: not searched for).
    key_to_mask: Bytes,
    /// The callers' token header, never forwarded.
    caller_token_header: HeaderName,
    upstream_timeout: Duration,
    stream_idle_timeout: Duration,
    max_body_bytes: u64,
    metrics: Metrics,
    redactor: Arc<Redactor>,
    /// `DEBUG_MODE`: bodies are logged, secrets masked.
    log_bodies: bool,
}

impl Upstream {
    pub fn new(config: &Config, metrics: Metrics, redactor: Arc<Redactor>) -> Upstream {
        let upstream = &config.upstream;
        Upstream(Arc::new(Inner {
            client: upstream.client.clone(),
            tunnel_client: upstream.tunnel_client.clone(),
            base_url: upstream.base_url.clone(),
            authorization: upstream.authorization.clone(),
            key_to_mask: searchable(&upstream.key),
            caller_token_header: config.auth_header.clone(),
            upstream_timeout: config.limits.upstream_timeout,
            stream_idle_timeout: config.limits.stream_idle_timeout,
            max_body_bytes: config.limits.max_body_bytes,
            metrics,
            redactor,
            log_bodies: config.debug_mode,
        }))
    }

    fn key_to_mask(&self) -> &[u8] {
        &self.0.key_to_mask
    }

    fn body_log(&self) -> Option<Arc<Redactor>> {
        self.0.log_bodies.then(|| self.0.redactor.clone())
    }

    /// Sends the caller's request upstream with the key swapped in, and waits for the answer's
    /// headers.
    pub async fn forward<S, B>(
        &self,
        headers: HeaderMap,
        method: Method,
        path: &str,
        query: Option<&str>,
        body: S,
    ) -> Result<reqwest::Response, ProxyError>
    where
        S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
        B: Buf + Send,
    {
        let url = request::upstream_url(&self.0.base_url, path, query)?;
        // A declared length over the limit is refused before the upstream hears of the request.
        let max_body = self.0.max_body_bytes;
        if headers::declared_length(&headers).is_some_and(|length| length > max_body) {
            return Err(ProxyError::PayloadTooLarge);
        }
        let body = headers::has_body(&headers)
            .then(|| request::request_body(body, max_body, self.body_log()));
        let headers =
            headers::request_headers(headers, &self.0.caller_token_header, &self.0.authorization);
        self.send(method, url, headers, body).await
    }

    /// Sends one request upstream and waits for its response headers.
    async fn send(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, ProxyError> {
        self.send_with(&self.0.client, method, url, headers, body)
            .await
    }

    async fn send_with(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, ProxyError> {
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
                Err(ProxyError::GatewayTimeout)
            }
            Ok(Err(err)) if caused_by_body_limit(&err) => {
                log::info!("request body over MAX_BODY_BYTES: upstream request aborted");
                Err(ProxyError::PayloadTooLarge)
            }
            Ok(Err(err)) if is_out_of_descriptors(&err) => {
                log::error!(
                    "cannot open an upstream connection: this process is out of file descriptors \
                     (a local resource limit, not an upstream failure); answering 503"
                );
                metrics.upstream_failure(UpstreamFailure::LocalLimit);
                Err(ProxyError::Overloaded)
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
                Err(error)
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
