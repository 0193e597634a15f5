//! Stream adapters on the body paths: a size cap on what callers upload, and on what the upstream
//! sends the one adapter of the success path: idle watchdog with an honest failure, the optional
//! SSE keep-alive, the usage tap and the debug chunk log, all in one poll (key masking, for the
//! rare error bodies, is in `auth::redact`).
//!
//! None of them copies, splits or merges chunks on the success path: bytes pass through as the
//! same `Bytes` handles.

use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::time::{Instant, Sleep};

use super::usage::UsageMeter;
use crate::auth::redact::{Redactor, error_chain};
use crate::error::ErrorFormat;
pub use crate::error::StreamFailure;
use crate::ops::metrics::{Metrics, UpstreamFailure};

/// The caller's body went past `MAX_BODY_BYTES`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body larger than MAX_BODY_BYTES")
    }
}

impl Error for BodyTooLarge {}

/// Whether `BodyTooLarge` is anywhere in an error's chain of causes.
pub fn caused_by_body_limit(err: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if current.is::<BodyTooLarge>() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Fails with `BodyTooLarge` as soon as more than `limit` bytes have streamed through, which
/// aborts the upstream request before the upstream has a complete body to act on.
pub struct LimitedBody<S> {
    inner: S,
    remaining: u64,
}

impl<S> LimitedBody<S> {
    pub fn new(inner: S, limit: u64) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
        }
    }
}

impl<S, E> Stream for LimitedBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<Box<dyn Error + Send + Sync>>,
{
    type Item = Result<Bytes, Box<dyn Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            Some(Ok(chunk)) => match self.remaining.checked_sub(chunk.len() as u64) {
                Some(remaining) => {
                    self.remaining = remaining;
                    Poll::Ready(Some(Ok(chunk)))
                }
                None => Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
            },
            Some(Err(err)) => Poll::Ready(Some(Err(err.into()))),
            None => Poll::Ready(None),
        }
    }
}

enum Phase {
    Streaming,
    /// The error event has been handed out. One poll answers `Pending` (and wakes itself) so
    /// hyper flushes the event before the next poll fails the body; hyper then ends the response
    /// abnormally (no final chunk) and raw HTTP clients see a truncated transfer.
    Failing(StreamFailure),
    Flushed(StreamFailure),
    Done,
}

/// The SSE comment sent while an answer is silent: one line, no blank line after it. A blank
/// line would end an (empty) event, which openai-python dispatches and fails to parse once an
/// earlier event carried `id:`.
pub const KEEPALIVE_COMMENT: &[u8] = b": keepalive\n";

/// Watches an upstream body: more than `idle` without a chunk, or a broken connection, ends the
/// response abnormally after (for SSE) one final error event. With a keep-alive, an SSE answer
/// silent that long at an event boundary gets a comment line, so idle timeouts of load balancers
/// between us and the client do not cut it. With a meter, every chunk is shown to it as it
/// passes.
///
/// One adapter rather than a chain of them: a streamed chunk costs one poll here, on the
/// upstream stream itself (not boxed again), whatever the features in use.
pub struct GuardedBody<S> {
    inner: S,
    /// The usage tap; its `Drop` reports, so it goes when the body does.
    meter: Option<UsageMeter>,
    /// `DEBUG_MODE`: every chunk logged, secrets masked.
    chunk_log: Option<Arc<Redactor>>,
    idle: Duration,
    /// Created the first time the upstream makes us wait (a small answer often never does); after
    /// that a chunk only records the time and the timer is re-armed when it fires early, so the
    /// per-chunk path never touches the timer wheel.
    deadline: Option<Pin<Box<Sleep>>>,
    last_chunk: Instant,
    /// Whether a failure is told with a final SSE error event, and in which `ERROR_FORMAT` (an
    /// event stream of undeclared length), or only by ending the body abnormally (`None`).
    error_event: Option<ErrorFormat>,
    ended_on_event_boundary: bool,
    /// The last four bytes of the body so far, to see an event end split across chunks.
    tail: [u8; 4],
    keepalive: Option<Duration>,
    /// When the client last got bytes (a chunk or a keep-alive comment).
    last_sent: Instant,
    phase: Phase,
    metrics: Metrics,
}

impl<S> GuardedBody<S> {
    pub fn new(
        inner: S,
        idle: Duration,
        error_event: Option<ErrorFormat>,
        metrics: Metrics,
    ) -> Self {
        let now = Instant::now();
        GuardedBody {
            inner,
            meter: None,
            chunk_log: None,
            idle,
            deadline: None,
            last_chunk: now,
            error_event,
            ended_on_event_boundary: true,
            tail: *b"\n\n\n\n",
            keepalive: None,
            last_sent: now,
            phase: Phase::Streaming,
            metrics,
        }
    }

    /// Sends `KEEPALIVE_COMMENT` whenever the body has been silent for `every` at an event boundary.
    pub fn with_keepalive(mut self, every: Duration) -> Self {
        self.keepalive = Some(every);
        self
    }

    /// Shows every chunk to `meter` (usage, event count) as it passes.
    pub fn with_meter(mut self, meter: UsageMeter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Logs every chunk at debug level, masked by `redactor`.
    pub fn with_chunk_log(mut self, redactor: Arc<Redactor>) -> Self {
        self.chunk_log = Some(redactor);
        self
    }

    /// Records the end of a chunk: whether the body now stands between two events. An event ends
    /// with a blank line (`\n\n`, `\r\n\r\n` or `\r\r`), possibly split across chunks.
    fn note_chunk(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        let take = chunk.len().min(4);
        self.tail.copy_within(take.., 0);
        self.tail[4 - take..].copy_from_slice(&chunk[chunk.len() - take..]);
        self.ended_on_event_boundary = self.tail.ends_with(b"\n\n")
            || self.tail.ends_with(b"\r\r")
            || self.tail == *b"\r\n\r\n";
    }

    /// When the next keep-alive is due, if one may be sent at all now.
    fn keepalive_due(&self) -> Option<Instant> {
        let every = self.keepalive?;
        self.ended_on_event_boundary.then(|| self.last_sent + every)
    }

    fn fail(&mut self, failure: StreamFailure) -> Poll<Option<Result<Bytes, StreamFailure>>> {
        log::error!("upstream body ended early: {failure}");
        self.metrics.upstream_failure(match failure {
            StreamFailure::Stalled => UpstreamFailure::Timeout,
            StreamFailure::Interrupted => UpstreamFailure::Reset,
        });
        let Some(format) = self.error_event else {
            self.phase = Phase::Done;
            return Poll::Ready(Some(Err(failure)));
        };
        self.phase = Phase::Failing(failure);
        let event = failure.sse_event(format);
        if self.ended_on_event_boundary {
            return Poll::Ready(Some(Ok(event)));
        }
        // Close the half-sent event first so the error arrives as an event of its own.
        let mut separated = BytesMut::with_capacity(event.len() + 2);
        separated.extend_from_slice(b"\n\n");
        separated.extend_from_slice(&event);
        Poll::Ready(Some(Ok(separated.freeze())))
    }
}

impl<S, E> Stream for GuardedBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<Box<dyn Error + Send + Sync>>,
{
    type Item = Result<Bytes, StreamFailure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.phase {
            Phase::Done => return Poll::Ready(None),
            Phase::Failing(failure) => {
                this.phase = Phase::Flushed(failure);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Phase::Flushed(failure) => {
                this.phase = Phase::Done;
                return Poll::Ready(Some(Err(failure)));
            }
            Phase::Streaming => {}
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.last_chunk = Instant::now();
                this.note_chunk(&chunk);
                if this.keepalive.is_some() {
                    this.last_sent = this.last_chunk;
                }
                if let Some(meter) = &mut this.meter {
                    meter.observe(&chunk);
                }
                if let Some(redactor) = &this.chunk_log {
                    log::debug!("response body chunk: {}", redactor.mask_bytes(&chunk));
                }
                return Poll::Ready(Some(Ok(chunk)));
            }
            Poll::Ready(Some(Err(err))) => {
                // Through `error_chain` when it is reqwest's: its message may carry the upstream
                // URL, and with it an `UPSTREAM_QUERY` a provider takes its key in.
                let err: Box<dyn Error + Send + Sync> = err.into();
                match err.downcast_ref::<reqwest::Error>() {
                    Some(err) => log::debug!("upstream body error: {}", error_chain(err)),
                    None => log::debug!("upstream body error: {err}"),
                }
                return this.fail(StreamFailure::Interrupted);
            }
            Poll::Ready(None) => {
                this.phase = Phase::Done;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let idle_due = this.last_chunk + this.idle;
        let keepalive_due = this.keepalive_due();
        let due = keepalive_due.map_or(idle_due, |keepalive| keepalive.min(idle_due));
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // Without a keep-alive the due time only ever moves later, and a timer firing early is
        // re-armed; with one, it can move earlier (an event just ended), so it is re-armed here.
        if keepalive_due.is_some() && due < deadline.deadline() {
            deadline.as_mut().reset(due);
        }
        loop {
            ready!(deadline.as_mut().poll(cx));
            let now = Instant::now();
            let idle_due = this.last_chunk + this.idle;
            if idle_due <= now {
                return this.fail(StreamFailure::Stalled);
            }
            // Field by field: `deadline` borrows `this.deadline` mutably.
            let keepalive_due = (this.keepalive)
                .filter(|_| this.ended_on_event_boundary)
                .map(|every| this.last_sent + every);
            match keepalive_due {
                Some(keepalive_due) if keepalive_due <= now => {
                    this.last_sent = now;
                    return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE_COMMENT))));
                }
                Some(keepalive_due) => deadline.as_mut().reset(keepalive_due.min(idle_due)),
                None => deadline.as_mut().reset(idle_due),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::convert::Infallible;

    #[tokio::test]
    async fn body_limit_counts_across_chunks() {
        let chunks = || {
            futures::stream::iter(
                ["abc", "def"].map(|c| Ok::<_, Infallible>(Bytes::from_static(c.as_bytes()))),
            )
        };
        let fits: Vec<_> = LimitedBody::new(chunks(), 6).collect().await;
        assert!(fits.iter().all(Result::is_ok));
        let too_big: Vec<_> = LimitedBody::new(chunks(), 5).collect().await;
        let err = too_big[1].as_ref().unwrap_err();
        assert!(caused_by_body_limit(err.as_ref()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_fails_with_an_error_event_then_an_error() {
        let silent =
            futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"data: 1\n\n"))])
                .chain(futures::stream::pending());
        let mut guarded = GuardedBody::new(
            silent,
            Duration::from_secs(5),
            Some(ErrorFormat::Proxy),
            Metrics::new(),
        );
        assert_eq!(guarded.next().await.unwrap().unwrap(), "data: 1\n\n");
        let event = guarded.next().await.unwrap().unwrap();
        assert!(event.starts_with(b"data: {\"error\""));
        assert!(String::from_utf8_lossy(&event).contains("upstream_stream_stalled"));
        assert_eq!(
            guarded.next().await.unwrap().unwrap_err(),
            StreamFailure::Stalled
        );
        assert!(guarded.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_fill_silences_between_events_only() {
        let started = Instant::now();
        let at = |secs: u64, bytes: &'static [u8]| (secs, bytes);
        // An event, 3.5 s of silence, half an event, 3 s of silence, its end, then the end.
        let script = [
            at(0, b"data: 1\n\n"),
            at(3500, b"data: pa"),
            at(6500, b"rt\n\n"),
        ];
        let upstream = futures::stream::unfold(0, move |n| async move {
            let (ms, bytes) = *script.get(n)?;
            tokio::time::sleep_until(started + Duration::from_millis(ms)).await;
            Some((Ok::<_, Infallible>(Bytes::from_static(bytes)), n + 1))
        });
        let guarded = GuardedBody::new(
            Box::pin(upstream),
            Duration::from_secs(60),
            Some(ErrorFormat::Proxy),
            Metrics::new(),
        )
        .with_keepalive(Duration::from_secs(1));
        let seen: Vec<(u128, Bytes)> = guarded
            .map(|chunk| (started.elapsed().as_millis(), chunk.unwrap()))
            .collect()
            .await;
        let keepalive = Bytes::from_static(KEEPALIVE_COMMENT);
        let expected: Vec<(u128, Bytes)> = vec![
            (0, Bytes::from_static(b"data: 1\n\n")),
            (1000, keepalive.clone()),
            (2000, keepalive.clone()),
            (3000, keepalive.clone()),
            (3500, Bytes::from_static(b"data: pa")),
            (6500, Bytes::from_static(b"rt\n\n")),
        ];
        assert_eq!(seen, expected, "none inside the half-sent event");
    }

    #[tokio::test(start_paused = true)]
    async fn without_keepalive_a_silence_adds_nothing() {
        let upstream = futures::stream::iter([Ok::<_, Infallible>(Bytes::from_static(
            b"data: 1\n\n",
        ))])
        .chain(futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Bytes::from_static(b"data: 2\n\n"))
        }));
        let guarded = GuardedBody::new(
            Box::pin(upstream),
            Duration::from_secs(60),
            Some(ErrorFormat::Proxy),
            Metrics::new(),
        );
        let all: Vec<Bytes> = guarded.map(Result::unwrap).collect().await;
        assert_eq!(all, ["data: 1\n\n", "data: 2\n\n"]);
    }

    #[test]
    fn event_ends_are_seen_across_chunks_and_line_endings() {
        let mut guarded = GuardedBody::new(
            futures::stream::empty::<Result<Bytes, Infallible>>(),
            Duration::from_secs(1),
            Some(ErrorFormat::Proxy),
            Metrics::new(),
        );
        for (chunk, boundary) in [
            (&b"data: 1\n"[..], false),
            (b"\n", true),
            (b"data: 2\r\n\r\n", true),
            (b"data: 3\r\n\r", false),
            (b"\n", true),
            (b"data: 4\r", false),
            (b"\r", true),
            (b"", true),
            (b"data", false),
        ] {
            guarded.note_chunk(chunk);
            assert_eq!(guarded.ended_on_event_boundary, boundary, "{chunk:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_stream_is_never_cut() {
        let ticks = futures::stream::unfold(0, |n| async move {
            if n == 20 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            Some((
                Ok::<_, Infallible>(Bytes::from_static(b"data: x\n\n")),
                n + 1,
            ))
        });
        let guarded = GuardedBody::new(
            Box::pin(ticks),
            Duration::from_secs(5),
            Some(ErrorFormat::Proxy),
            Metrics::new(),
        );
        let all: Vec<_> = guarded.collect().await;
        assert_eq!(all.len(), 20);
        assert!(all.iter().all(Result::is_ok));
    }
}
