//! The streamed chat completion: a hand-written `Stream` so that each SSE
//! event is its own body frame, pauses happen *between* events only, and a
//! drop before the end is observable as a cancellation.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Sleep};
use warp::Reply;
use warp::http::HeaderValue;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use warp::reply::Response;

use crate::State;
use crate::handlers::PROMPT_TOKENS;

pub(crate) struct Plan {
    /// Already JSON-encoded (quoted and escaped).
    pub(crate) model: String,
    pub(crate) chunks: usize,
    pub(crate) interval: Duration,
    pub(crate) include_usage: bool,
    /// The final usage object, as `x-mock-usage` chose it; else counted from the plan.
    pub(crate) usage: Option<String>,
}

pub(crate) fn response(state: Arc<State>, plan: Plan) -> Response {
    let stream = SseStream::start(state, plan);
    let mut res = warp::reply::stream(stream).into_response();
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-request-id", HeaderValue::from_static("req_mock_stream"));
    res
}

struct SseStream {
    state: Arc<State>,
    plan: Plan,
    /// This stream's number for `State::last_stream`; 0 when not recording.
    id: u64,
    next: usize,
    total: usize,
    /// Created on first use and then reset, so a long stream allocates one
    /// timer rather than one per event.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set once the event after which the pause must elapse has been yielded.
    waiting: bool,
    completed: bool,
}

impl SseStream {
    fn start(state: Arc<State>, plan: Plan) -> SseStream {
        state.streams_started.fetch_add(1, Ordering::SeqCst);
        let id = if state.record {
            let id = state.stream_seq.fetch_add(1, Ordering::SeqCst) + 1;
            let mut last = state.last_stream.lock();
            last.id = id;
            last.bytes.clear();
            id
        } else {
            0
        };
        // role, contents, finish, [usage], [DONE]
        let total = plan.chunks + 3 + usize::from(plan.include_usage);
        SseStream {
            state,
            plan,
            id,
            next: 0,
            total,
            sleep: None,
            waiting: false,
            completed: false,
        }
    }

    fn event(&self, index: usize) -> Bytes {
        let chunks = self.plan.chunks;
        if index == self.total - 1 {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        if self.plan.include_usage && index == chunks + 2 {
            let p = PROMPT_TOKENS;
            let usage = match &self.plan.usage {
                Some(usage) => format!(r#","usage":{usage}"#),
                None => format!(
                    r#","usage":{{"prompt_tokens":{p},"completion_tokens":{chunks},"total_tokens":{}}}"#,
                    p + chunks
                ),
            };
            return self.chunk("[]", &usage);
        }
        // OpenAI sends `"usage":null` on every other chunk when usage was asked for.
        let usage = if self.plan.include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let choice = if index == 0 {
            choice(r#"{"role":"assistant","content":""}"#, "null")
        } else if index <= chunks {
            choice(&format!(r#"{{"content":"chunk-{} "}}"#, index - 1), "null")
        } else {
            choice("{}", r#""stop""#)
        };
        self.chunk(&choice, usage)
    }

    fn chunk(&self, choices: &str, tail: &str) -> Bytes {
        Bytes::from(format!(
            concat!(
                r#"data: {{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"#,
                r#""model":{},"system_fingerprint":null,"choices":{}{}}}"#,
                "\n\n"
            ),
            self.plan.model, choices, tail
        ))
    }
}

fn choice(delta: &str, finish_reason: &str) -> String {
    format!(r#"[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish_reason}}}]"#)
}

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.next >= this.total {
            return Poll::Ready(None);
        }
        if this.waiting {
            if let Some(sleep) = this.sleep.as_mut()
                && sleep.as_mut().poll(cx).is_pending()
            {
                return Poll::Pending;
            }
            this.waiting = false;
        }

        let event = this.event(this.next);
        this.next += 1;
        if this.id != 0 {
            let mut last = this.state.last_stream.lock();
            if last.id == this.id {
                last.bytes.extend_from_slice(&event);
            }
        }
        if this.next == this.total {
            this.completed = true;
            this.state.streams_completed.fetch_add(1, Ordering::SeqCst);
        } else if !this.plan.interval.is_zero() {
            let deadline = Instant::now() + this.plan.interval;
            match this.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.waiting = true;
        }
        Poll::Ready(Some(Ok(event)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if !self.completed {
            self.state.streams_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}
