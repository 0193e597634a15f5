//! The upstream's answer as the caller's response: same status, end-to-end headers, and the body
//! forwarded chunk by chunk as it arrives, bytes untouched, under the idle watchdog.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use warp::Reply;
use warp::http::{HeaderMap, StatusCode, header};

use super::Upstream;
use super::body::{GuardedBody, StreamFailure};
use super::headers::{declared_length, is_event_stream, response_headers};
use super::usage::{Metering, UsageMeter};
use crate::auth::redact::{SecretMask, error_chain, mask_secret};
use crate::error::ProxyError;

/// An error body under its key masks. warp needs response streams to be `Sync` as well as `Send`.
type MaskedBody = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send + Sync>>;

/// Error bodies up to this size are read whole, so that when they hold no secret they go out
/// exactly as the upstream framed them, `Content-Length` included.
const SMALL_ERROR_BODY: u64 = 64 * 1024;

/// A response for the caller, and whether it is a server-sent-event stream.
pub struct Forwarded {
    pub response: warp::reply::Response,
    pub stream: bool,
}

impl Upstream {
    /// Non-2xx bodies go through the key mask: an upstream may echo the credentials it rejected.
    /// With `metering`, a successful answer's body is watched to its end: its `usage` counted
    /// and reported (see [`Metering`]).
    pub async fn into_reply(
        &self,
        mut upstream: reqwest::Response,
        metering: Option<Metering>,
    ) -> Forwarded {
        let status = upstream.status();
        let mut headers =
            response_headers(std::mem::take(upstream.headers_mut()), self.keys_to_mask());
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "upstream response: {status} headers: {}",
                self.0.redactor.describe_headers(&headers)
            );
        }
        let stream = is_event_stream(&headers);
        if !status.is_success()
            && declared_length(&headers).is_some_and(|length| length <= SMALL_ERROR_BODY)
        {
            let response = self.small_error_reply(status, headers, upstream).await;
            return Forwarded { response, stream };
        }
        // An error event cannot be added to a body whose length was declared.
        let error_event = stream && !headers.contains_key(header::CONTENT_LENGTH);
        if !status.is_success() {
            // Masking may change the length.
            headers.remove(header::CONTENT_LENGTH);
            // One mask per key of the pool: error bodies are rare and pools small, so this path
            // may box and chain adapters.
            let mut body: MaskedBody = Box::pin(upstream.bytes_stream());
            for key in self.keys_to_mask() {
                body = Box::pin(SecretMask::new(body, key.clone()));
            }
            let guarded = self.guarded(body, error_event);
            return Forwarded {
                response: reply(guarded, status, headers),
                stream,
            };
        }
        // The success path: reqwest's body stream, unboxed, under the one adapter.
        let mut guarded = self.guarded(upstream.bytes_stream(), error_event);
        if let Some(metering) = metering {
            guarded = guarded.with_meter(UsageMeter::new(self.0.metrics.clone(), metering));
        }
        // Comment lines can only be added where an error event could: an SSE answer of undeclared
        // length; and only to a successful one, where a client waits for events.
        if error_event && let Some(every) = self.0.sse_keepalive {
            guarded = guarded.with_keepalive(every);
        }
        Forwarded {
            response: reply(guarded, status, headers),
            stream,
        }
    }

    /// The idle watchdog over `body`, with the debug chunk log when bodies are logged.
    fn guarded<S>(&self, body: S, error_event: bool) -> GuardedBody<S> {
        let guarded = GuardedBody::new(
            body,
            self.0.stream_idle_timeout,
            error_event.then_some(self.0.error_format),
            self.0.metrics.clone(),
        );
        match self.body_log() {
            Some(redactor) => guarded.with_chunk_log(redactor),
            None => guarded,
        }
    }

    async fn small_error_reply(
        &self,
        status: StatusCode,
        mut headers: HeaderMap,
        upstream: reqwest::Response,
    ) -> warp::reply::Response {
        let read = tokio::time::timeout(self.0.stream_idle_timeout, upstream.bytes());
        let mut body = match read.await {
            Ok(Ok(body)) => body,
            Ok(Err(err)) => {
                log::error!(
                    "reading an upstream error body failed: {}",
                    error_chain(&err)
                );
                return ProxyError::BadGateway.into_response(self.0.error_format);
            }
            Err(_) => {
                log::error!("the upstream stalled while sending an error body");
                return ProxyError::GatewayTimeout.into_response(self.0.error_format);
            }
        };
        if let Some(masked) = mask_every(&body, self.keys_to_mask()) {
            headers.remove(header::CONTENT_LENGTH);
            body = masked;
        }
        if self.0.log_bodies {
            log::debug!("response body: {}", self.0.redactor.mask_bytes(&body));
        }
        let mut response = warp::reply::Response::new(body.into());
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

/// A streamed answer: warp boxes the body once (its `Body` is a `BoxBody`); nothing else does.
fn reply<S>(body: GuardedBody<S>, status: StatusCode, headers: HeaderMap) -> warp::reply::Response
where
    GuardedBody<S>: Stream<Item = Result<Bytes, StreamFailure>> + Send + Sync + 'static,
{
    let mut response = warp::reply::stream(body).into_response();
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// `body` with every key masked, or `None` when it holds none.
pub(super) fn mask_every(body: &Bytes, keys: &[Bytes]) -> Option<Bytes> {
    let mut masked: Option<Bytes> = None;
    for key in keys {
        let current = masked.as_ref().unwrap_or(body);
        if let Some(next) = mask_secret(current, key) {
            masked = Some(next.freeze());
        }
    }
    masked
}
