//! One access line and one set of metric observations per request, written when the response
//! body is dropped: after its last byte went out, or when the client went away.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use warp::http::{HeaderValue, Method, Request, Response, StatusCode, Uri};

use super::exchange::{Exchange, Spend};
use super::metrics::Metrics;
use super::request_id::REQUEST_ID;
use crate::config::LogFormat;
use crate::vocab::Route;
use crate::vocab::price::format_usd;

/// The log target of access lines; the JSON log format recognises it.
pub const ACCESS_TARGET: &str = "llm_proxy::access";
/// nginx's convention for a request whose client left before any response.
const CLIENT_CLOSED_REQUEST: u16 = 499;

pub struct AccessRecord {
    id: HeaderValue,
    method: Method,
    uri: Uri,
    route: Route,
    started: Instant,
    status: Option<StatusCode>,
    headers_ready: Option<Duration>,
    first_byte: Option<Duration>,
    bytes_out: u64,
    bytes_in: Arc<AtomicU64>,
    /// hyper stops polling a body once it has written a declared `Content-Length`, so reaching
    /// that length counts as complete even though the end of the body is never polled.
    declared_length: Option<u64>,
    completed: bool,
    failed: bool,
    /// How a WebSocket tunnel ended (`closed`, `idle`, `failed`, `drained`).
    tunnel_outcome: Option<&'static str>,
    exchange: Option<Exchange>,
    spend: Option<Spend>,
    upstream_request_id: Option<HeaderValue>,
    metrics: Metrics,
    format: LogFormat,
}

impl AccessRecord {
    /// Starts the record; the returned counter is for the request body's bytes.
    pub fn start<B>(
        request: &Request<B>,
        route: Route,
        id: HeaderValue,
        metrics: Metrics,
        format: LogFormat,
    ) -> (AccessRecord, Arc<AtomicU64>) {
        metrics.requests_in_flight().inc();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let record = AccessRecord {
            id,
            method: request.method().clone(),
            uri: request.uri().clone(),
            route,
            started: Instant::now(),
            status: None,
            headers_ready: None,
            first_byte: None,
            bytes_out: 0,
            bytes_in: bytes_in.clone(),
            declared_length: None,
            completed: false,
            failed: false,
            tunnel_outcome: None,
            exchange: None,
            spend: None,
            upstream_request_id: None,
            metrics,
            format,
        };
        (record, bytes_in)
    }

    pub fn id(&self) -> &HeaderValue {
        &self.id
    }

    pub fn for_response<B: Body>(mut self, response: &Response<B>) -> AccessRecord {
        self.status = Some(response.status());
        self.headers_ready = Some(self.started.elapsed());
        let headers = response.headers();
        self.declared_length = headers
            .get(warp::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok())
            .or_else(|| response.body().size_hint().exact());
        self.upstream_request_id = headers.get(&REQUEST_ID).cloned();
        self.exchange = response.extensions().get::<Exchange>().cloned();
        self.spend = response.extensions().get::<Spend>().cloned();
        if self.is_stream() {
            self.metrics.streams_in_flight().inc();
        }
        self
    }

    /// A WebSocket tunnel ended: its bytes each way join the request's, and it is complete when
    /// both sides closed.
    pub fn tunnel_ended(&mut self, to_upstream: u64, to_caller: u64, outcome: &'static str) {
        self.bytes_in.fetch_add(to_upstream, Ordering::Relaxed);
        self.bytes_out += to_caller;
        self.tunnel_outcome = Some(outcome);
    }

    fn is_stream(&self) -> bool {
        self.exchange
            .as_ref()
            .is_some_and(|exchange| exchange.stream)
    }

    fn outcome(&self) -> &'static str {
        if let Some(outcome) = self.tunnel_outcome {
            outcome
        } else if self.status.is_none() {
            "client_gone"
        } else if self.completed
            || self.declared_length == Some(self.bytes_out)
            || self.method == Method::HEAD
        {
            "complete"
        } else if self.failed {
            "upstream_failed"
        } else {
            "client_gone"
        }
    }

    /// Time to response headers spent in the proxy, the upstream's wait taken out.
    fn overhead(&self) -> Option<Duration> {
        let ready = self.headers_ready?;
        let waited = self
            .exchange
            .as_ref()
            .and_then(|exchange| exchange.upstream_wait)
            .unwrap_or_default();
        Some(ready.saturating_sub(waited))
    }

    fn write_line(&self, duration: Duration) {
        let status = self
            .status
            .map_or(CLIENT_CLOSED_REQUEST, |status| status.as_u16());
        let client = self
            .exchange
            .as_ref()
            .map_or("-", |exchange| &*exchange.client);
        let upstream_id = self
            .upstream_request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        let id = self.id.to_str().unwrap_or("-");
        let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let model = self.spend.as_ref().and_then(Spend::model);
        let model = model.as_deref();
        let (usage, cost) = self.spend.as_ref().map_or((None, None), |spend| {
            let answered = spend.answered.lock();
            (answered.usage, answered.cost)
        });
        let way = self
            .exchange
            .as_ref()
            .and_then(|exchange| exchange.way.as_deref());
        // The path only: query strings are the caller's business and may carry secrets.
        match self.format {
            LogFormat::Json => log::info!(
                target: ACCESS_TARGET,
                "{}",
                json!({
                    "request_id": id,
                    "client": client,
                    "method": self.method.as_str(),
                    "path": self.uri.path(),
                    "route": self.route.label(),
                    "status": status,
                    "duration_ms": round(millis(duration)),
                    "ttfb_ms": self.first_byte.map(|ttfb| round(millis(ttfb))),
                    "bytes_in": bytes_in,
                    "bytes_out": self.bytes_out,
                    "stream": self.is_stream(),
                    "outcome": self.outcome(),
                    "upstream_request_id": self.upstream_request_id.as_ref().and_then(|id| id.to_str().ok()),
                    "model": model,
                    "prompt_tokens": usage.map(|usage| usage.prompt),
                    "completion_tokens": usage.map(|usage| usage.completion),
                    // Six decimals, as the text line writes them.
                    "cost_usd": cost.and_then(json_usd),
                    "upstream": way.map(|way| way.upstream()),
                    "attempts": way.map(|way| way.attempts()),
                    "failover": way.and_then(|way| way.failover()),
                })
            ),
            LogFormat::Text => with_line_buffer(|line| {
                line.clear();
                push(
                    line,
                    &[self.method.as_str(), " ", self.uri.path(), " status="],
                );
                push_count(line, u64::from(status));
                line.push_str(" duration_ms=");
                push_millis(line, Some(duration));
                // `ttfb_ms=-` when no body byte was ever sent.
                line.push_str(" ttfb_ms=");
                push_millis(line, self.first_byte);
                line.push_str(" bytes_in=");
                push_count(line, bytes_in);
                line.push_str(" bytes_out=");
                push_count(line, self.bytes_out);
                let stream = if self.is_stream() { "true" } else { "false" };
                push(line, &[" stream=", stream, " client=", client, " outcome="]);
                push(
                    line,
                    &[self.outcome(), " req=", id, " upstream_req=", upstream_id],
                );
                push(line, &[" model=", model.unwrap_or("-"), " prompt_tokens="]);
                push_optional_count(line, usage.map(|usage| usage.prompt));
                line.push_str(" completion_tokens=");
                push_optional_count(line, usage.map(|usage| usage.completion));
                line.push_str(" cost_usd=");
                push_usd(line, cost);
                if let Some(way) = way {
                    push(line, &[" upstream=", way.upstream(), " attempts="]);
                    push_count(line, u64::from(way.attempts()));
                    push(line, &[" failover=", way.failover().unwrap_or("-")]);
                }
                log::info!(target: ACCESS_TARGET, "{line}");
            }),
        }
    }
}

thread_local! {
    /// The text access line is assembled here, one buffer per worker thread reused by every
    /// request: no allocation and no formatting machinery per field.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}
/// Runs `write` on the thread's reused line buffer, or on a fresh one when that is not to be had
/// (the thread's locals being torn down as a worker exits, with a record still to write).
fn with_line_buffer(write: impl FnOnce(&mut String)) {
    let mut write = Some(write);
    let _ = LINE.try_with(|cell| {
        if let (Ok(mut line), Some(write)) = (cell.try_borrow_mut(), write.take()) {
            write(&mut line);
        }
    });
    if let Some(write) = write.take() {
        write(&mut String::new());
    }
}

fn push(line: &mut String, parts: &[&str]) {
    for part in parts {
        line.push_str(part);
    }
}

fn push_count(line: &mut String, count: u64) {
    line.push_str(itoa::Buffer::new().format(count));
}

fn push_optional_count(line: &mut String, count: Option<u64>) {
    match count {
        Some(count) => push_count(line, count),
        None => line.push('-'),
    }
}

/// Dollars rounded to six decimals as a JSON number, the text line's value.
fn json_usd(nanos: u64) -> Option<f64> {
    format_usd(nanos).parse().ok()
}

/// Dollars with six decimals (as [`format_usd`] writes them), or `-`, from integers: no
/// allocation per line.
fn push_usd(line: &mut String, nanos: Option<u64>) {
    let Some(nanos) = nanos else {
        line.push('-');
        return;
    };
    let micros = nanos.saturating_add(500) / 1_000;
    push_count(line, micros / 1_000_000);
    line.push('.');
    let fraction = micros % 1_000_000;
    // Zero-padded to six digits.
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(fraction);
    for _ in digits.len()..6 {
        line.push('0');
    }
    line.push_str(digits);
}

/// Milliseconds with one decimal, or `-`, from integers: float formatting was a visible share of
/// the access line's cost.
fn push_millis(line: &mut String, duration: Option<Duration>) {
    match duration {
        Some(duration) => {
            let tenths = (duration.as_micros() / 100).min(u128::from(u64::MAX)) as u64;
            push_count(line, tenths / 10);
            line.push('.');
            push_count(line, tenths % 10);
        }
        None => line.push('-'),
    }
}

fn round(millis: f64) -> f64 {
    (millis * 10.0).round() / 10.0
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        self.metrics.requests_in_flight().dec();
        if self.is_stream() {
            self.metrics.streams_in_flight().dec();
        }
        let status = self.status.unwrap_or(
            StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST),
        );
        self.metrics.record_request(
            self.route,
            &self.method,
            status,
            duration,
            self.first_byte,
            self.overhead(),
        );
        if log::log_enabled!(target: ACCESS_TARGET, log::Level::Info) {
            self.write_line(duration);
        }
    }
}

/// What a [`Tapped`] body reports each poll of its inner body to.
pub trait Tap {
    fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>);
}

/// A body passed through untouched while `tap` watches every poll.
pub struct Tapped<B, T> {
    inner: B,
    tap: T,
}

impl<B, T> Tapped<B, T> {
    pub fn new(inner: B, tap: T) -> Self {
        Tapped { inner, tap }
    }
}

impl<B, T> Body for Tapped<B, T>
where
    B: Body<Data = Bytes> + Unpin,
    T: Tap + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.tap.observe(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response side: the access record, and the request's place in `MAX_CONCURRENT_REQUESTS`,
/// both given up when the body is dropped (its last byte went out, or the client left).
///
/// A WebSocket tunnel takes both out: the record and the place then last as long as the tunnel.
pub struct ResponseTap {
    pub record: Option<AccessRecord>,
    pub permit: Option<OwnedSemaphorePermit>,
}

impl Tap for ResponseTap {
    fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        let Some(record) = &mut self.record else {
            return;
        };
        match polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    record.bytes_out += data.len() as u64;
                }
                record
                    .first_byte
                    .get_or_insert_with(|| record.started.elapsed());
            }
            Poll::Ready(Some(Err(_))) => record.failed = true,
            Poll::Ready(None) => {
                record.completed = true;
                record
                    .first_byte
                    .get_or_insert_with(|| record.started.elapsed());
            }
        }
    }
}

/// The request side: the bytes the caller sent.
pub struct RequestTap(pub Arc<AtomicU64>);

impl Tap for RequestTap {
    fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
        {
            self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_on_the_line_are_what_format_usd_writes() {
        for nanos in [
            0,
            1,
            499,
            500,
            1_234_499,
            1_234_500,
            4_000_000,
            12_000_005_000,
            u64::MAX,
        ] {
            let mut line = String::new();
            push_usd(&mut line, Some(nanos));
            assert_eq!(line, format_usd(nanos), "{nanos}");
        }
        let mut line = String::new();
        push_usd(&mut line, None);
        assert_eq!(line, "-");
        // The JSON line's number, as the README's example shows it (7 prompt and 5 completion
        // tokens of gpt-4o-mini: $0.00000405).
        assert_eq!(
            json!({ "cost_usd": json_usd(4_050) }).to_string(),
            r#"{"cost_usd":4e-6}"#
        );
        assert_eq!(
            json!({ "cost_usd": json_usd(4_000_000) }).to_string(),
            r#"{"cost_usd":0.004}"#
        );
    }
}
