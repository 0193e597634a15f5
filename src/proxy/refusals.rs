//! What an upstream refusal says about the key that got it. A 401 may be the key's fault or the
//! request's (a restricted key without the scope for one path): a probe with the key alone tells
//! them apart, and disabled keys are probed again until they are accepted. A 429 may name a
//! request larger than the limit itself, which no key and no wait would serve.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::keys::{KEY_CHECK_PATH, KeyChange, RATE_LIMIT_BODY_READ, exceeds_the_limit_itself};
use super::{Inner, Upstream};
use crate::auth::redact::error_chain;
use crate::ops::metrics::ProbeOutcome;
use crate::vocab::{Shape, classify};

/// Why a probe started: what its outcome is logged as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Occasion {
    /// A request got 401 with the key.
    Suspected,
    /// The key is disabled and probed again on the clock.
    Disabled,
}

impl Upstream {
    /// The key at `position` answered 401: it is probed alone in the background, unless a probe
    /// of it is on its way already (a burst of 401s makes one probe) or the pool has one key.
    /// Returns whether this call started the probe.
    ///
    /// The request that got the 401 does not wait for the probe: it may go on to another key at
    /// once, so a truly bad key costs its callers no more time than the retry; and a burst of
    /// hostile requests costs the upstream one probe per key at a time, each bounded by
    /// `UPSTREAM_TIMEOUT_SECS`.
    pub(super) fn suspect(&self, position: usize) -> bool {
        if !self.keys().begin_probe(position) {
            return false;
        }
        let upstream = self.clone();
        tokio::spawn(async move {
            let outcome = upstream.probe(position).await;
            upstream.settle(position, outcome, Occasion::Suspected);
        });
        true
    }

    /// `GET KEY_CHECK_PATH` with the key at `position` alone (no caller header, body or query
    /// but `UPSTREAM_QUERY`), within `UPSTREAM_TIMEOUT_SECS`.
    async fn probe(&self, position: usize) -> ProbeOutcome {
        let endpoint = classify(&Method::GET, KEY_CHECK_PATH, Shape::default());
        let (Ok(url), Some(key)) = (
            self.url(&endpoint, KEY_CHECK_PATH, None),
            self.keys().header_value(position),
        ) else {
            return ProbeOutcome::Inconclusive;
        };
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(&self.0.key_header, key);
        let request = self.client().get(url).headers(headers).send();
        let timeout = self.0.head_timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(answer)) if answer.status().is_success() => ProbeOutcome::Accepted,
            Ok(Ok(answer)) if answer.status() == StatusCode::UNAUTHORIZED => ProbeOutcome::Refused,
            Ok(Ok(answer)) => {
                log::info!(
                    "probe of upstream key {position} of {} answered {}: nothing learned about \
                     the key",
                    self.keys().len(),
                    answer.status().as_u16()
                );
                ProbeOutcome::Inconclusive
            }
            Ok(Err(err)) => {
                log::info!(
                    "probe of upstream key {position} of {} failed: {}",
                    self.keys().len(),
                    error_chain(&err)
                );
                ProbeOutcome::Inconclusive
            }
            Err(_) => {
                log::info!(
                    "probe of upstream key {position} of {} got no answer within {}s \
                     (UPSTREAM_TIMEOUT_SECS)",
                    self.keys().len(),
                    timeout.as_secs()
                );
                ProbeOutcome::Inconclusive
            }
        }
    }

    /// Applies a probe's outcome to the pool and says what happened.
    fn settle(&self, position: usize, outcome: ProbeOutcome, occasion: Occasion) {
        let pool = self.keys();
        let count = pool.len();
        match (pool.probed(position, outcome), occasion) {
            (KeyChange::Disabled, _) => {
                let every = pool.reprobe_every();
                log::error!(
                    "upstream key {position} of {count} (AUTH_BEARER) was refused with 401, and \
                     so was its probe (GET {KEY_CHECK_PATH} with the key alone): taken out of \
                     turn, probed again every {}s",
                    every.as_secs()
                );
                if pool.start_reprobing() {
                    tokio::spawn(reprobe(Arc::downgrade(&self.0), every));
                }
            }
            (KeyChange::Restored, _) => log::warn!(
                "upstream key {position} of {count} (AUTH_BEARER) was accepted by its probe: back \
                 in turn"
            ),
            (KeyChange::Unchanged, Occasion::Suspected) if outcome == ProbeOutcome::Accepted => {
                log::info!(
                    "upstream key {position} of {count} answered 401 to a request but was accepted \
                     by its probe: the refusal belonged to the request, the key stays in turn"
                );
            }
            (KeyChange::Unchanged, Occasion::Suspected) => log::info!(
                "upstream key {position} of {count} answered 401 to a request; its probe proved \
                 nothing, the key stays in turn"
            ),
            (KeyChange::Unchanged, Occasion::Disabled) => log::debug!(
                "upstream key {position} of {count} is still out of turn after its probe"
            ),
        }
    }

    /// Reads the start of a 429's body (at most `RATE_LIMIT_BODY_READ` bytes, within
    /// `UPSTREAM_TIMEOUT_SECS`) to tell whether the request is larger than the limit itself.
    /// The answer comes back rebuilt around the bytes read, the rest of its body still to stream,
    /// so the client gets it as it came.
    pub(super) async fn too_large_for_any_key(
        &self,
        mut answer: reqwest::Response,
    ) -> (reqwest::Response, bool) {
        if answer
            .content_length()
            .is_some_and(|length| length > RATE_LIMIT_BODY_READ as u64)
        {
            return (answer, false);
        }
        let mut read = BytesMut::new();
        let mut failure = None;
        let whole = tokio::time::timeout(self.0.head_timeout, async {
            loop {
                match answer.chunk().await {
                    Ok(Some(chunk)) => {
                        read.extend_from_slice(&chunk);
                        if read.len() > RATE_LIMIT_BODY_READ {
                            return false;
                        }
                    }
                    Ok(None) => return true,
                    Err(err) => {
                        failure = Some(err);
                        return false;
                    }
                }
            }
        })
        .await
        .unwrap_or(false);
        let too_large = whole && exceeds_the_limit_itself(&read);
        (rebuilt(answer, read.freeze(), whole, failure), too_large)
    }
}

/// `answer` with `read` as the start of its body: the whole body when `whole`, else followed by
/// what is left of it (or by the `failure` that cut it short).
fn rebuilt(
    mut answer: reqwest::Response,
    read: Bytes,
    whole: bool,
    failure: Option<reqwest::Error>,
) -> reqwest::Response {
    let mut response = warp::http::Response::new(reqwest::Body::from(Bytes::new()));
    *response.status_mut() = answer.status();
    *response.version_mut() = answer.version();
    *response.headers_mut() = std::mem::take(answer.headers_mut());
    *response.extensions_mut() = std::mem::take(answer.extensions_mut());
    let start = |read| futures::stream::once(async move { Ok::<Bytes, reqwest::Error>(read) });
    *response.body_mut() = match (whole, failure) {
        (true, _) => reqwest::Body::from(read),
        (false, Some(failure)) => reqwest::Body::wrap_stream(
            start(read).chain(futures::stream::once(async move { Err(failure) })),
        ),
        (false, None) => reqwest::Body::wrap_stream(start(read).chain(answer.bytes_stream())),
    };
    reqwest::Response::from(response)
}

/// Probes every disabled key each `every`, for as long as the upstream handle lives: it holds
/// the handle only during a round, so once the handle is dropped (a new configuration brings a
/// new pool) the task ends at its next round.
async fn reprobe(upstream: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = upstream.upgrade() else {
            return;
        };
        let upstream = Upstream(inner);
        let pool = upstream.keys();
        let probes = pool
            .disabled_keys()
            .into_iter()
            .filter(|&position| pool.begin_probe(position))
            .map(|position| {
                let upstream = &upstream;
                async move {
                    let outcome = upstream.probe(position).await;
                    upstream.settle(position, outcome, Occasion::Disabled);
                }
            });
        futures::future::join_all(probes).await;
    }
}
