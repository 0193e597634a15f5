//! A small mock of the OpenAI HTTP API.
//!
//! It serves three masters: the proxy's integration tests (in-process, as a
//! library), `scripts/smoke.sh` (as the `mock-upstream` binary) and the
//! benchmark (as a fast upstream, with recording switched off). Behaviour is
//! steered by `x-mock-*` request headers so that a test can drive the mock
//! *through* the proxy without any side channel.
//!
//! | header               | effect                                                   |
//! |----------------------|----------------------------------------------------------|
//! | `x-mock-status`      | answer with that status and an OpenAI-style error body   |
//! | `x-mock-message`     | the `message` of that error body                         |
//! | `x-mock-delay-ms`    | wait that long before sending the response headers       |
//! | `x-mock-chunks`      | number of content events in a streamed chat (default 5)  |
//! | `x-mock-interval-ms` | pause between streamed events (default 10)               |
//! | `x-mock-usage`       | `prompt,completion,cached`: a plain chat's usage         |
//!
//! Besides recording, it counts requests from their headers on (started,
//! then answered or abandoned), so a test can wait for the upstream to be
//! done with a request instead of sleeping and hoping.
//!
//! [`MockOptions`] mounts the API under another base path (as Zhipu's `/api/paas/v4` or an Azure
//! deployment), and [`MockUpstream::answer_key`] makes one upstream key always get one answer
//! (a key pool's rate-limited or revoked key) until [`MockUpstream::forget_key`].
//! [`MockOptions::models`] gives one upstream its own model list, and
//! [`MockUpstream::delay_heads`] makes one upstream slow to answer whatever the request says (the
//! `x-mock-*` headers reach every upstream a proxy tries, so they cannot slow down just one).
//!
//! [`MockUpstream::start_tls_on`] serves the same API over HTTPS with a [`SelfSigned`]
//! certificate, offering HTTP/2 and HTTP/1.1 by ALPN, as real providers do.

mod handlers;
mod sse;
mod tls;

pub use tls::SelfSigned;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::net::TcpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::Filter;
use warp::reject::Rejection;
use warp::reply::Reply;

/// How long [`MockUpstream::shutdown`] waits for in-flight responses (a slow
/// stream, a long `x-mock-delay-ms`) before it gives up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Raw path as received, still percent-encoded, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Raw query string without the leading `?`.
    pub query: Option<String>,
    /// Lower-case names with lossy UTF-8 values. Repeated headers are all
    /// kept; hyper groups the values of one name together, so the order is
    /// "first appearance of each name", then that name's values in order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The upstream key the request carried: a bearer token, else the `api-key` value.
    pub fn key(&self) -> Option<&str> {
        self.header("authorization")
            .and_then(|value| value.strip_prefix("Bearer "))
            .or_else(|| self.header("api-key"))
    }

    /// First value of a header; `name` is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, in the order received.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body parsed as JSON, or `None` if it is not JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Where and how the mock serves the API.
#[derive(Clone, Debug, Default)]
pub struct MockOptions {
    /// The base path standing for `/v1`: `/api/paas/v4` serves chat at
    /// `/api/paas/v4/chat/completions`; anything outside it is a 404.
    pub mount: Option<String>,
    /// Azure-like: only the `api-key` header is accepted as the key (401 without it, even with
    /// `Authorization`), and an `api-version` query parameter is required (400 without).
    pub azure: bool,
    /// The ids `GET /v1/models` lists and `GET /v1/models/{id}` knows, in this order; `None`:
    /// `gpt-mock`, `gpt-mock-mini` and `text-embedding-mock`.
    pub models: Option<Vec<String>>,
}

/// A fixed answer for every request made with one key.
#[derive(Clone, Debug)]
pub(crate) struct KeyAnswer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
}

/// State shared by the server and the [`MockUpstream`] handle.
pub(crate) struct State {
    pub(crate) options: MockOptions,
    /// By key (as sent: the bearer token, or the `api-key` value).
    pub(crate) key_answers: Mutex<Vec<(String, KeyAnswer)>>,
    /// Off for the benchmark, so a long run does not grow memory (and skips
    /// the per-event copy into `last_stream`).
    pub(crate) record: bool,
    pub(crate) requests: Mutex<Vec<RecordedRequest>>,
    /// Set by [`MockUpstream::delay_heads`]; 0: none.
    pub(crate) head_delay_ms: AtomicU64,
    pub(crate) models_fetches: AtomicUsize,
    pub(crate) requests_started: AtomicUsize,
    pub(crate) requests_answered: AtomicUsize,
    pub(crate) requests_abandoned: AtomicUsize,
    pub(crate) streams_started: AtomicUsize,
    pub(crate) streams_completed: AtomicUsize,
    pub(crate) streams_cancelled: AtomicUsize,
    /// Numbers streams so that only the most recently started one writes
    /// into `last_stream` when several run concurrently.
    pub(crate) stream_seq: AtomicU64,
    pub(crate) last_stream: Mutex<LastStream>,
}

pub(crate) struct LastStream {
    /// 0 until the first stream starts.
    pub(crate) id: u64,
    pub(crate) bytes: BytesMut,
}

impl State {
    fn new(record: bool, options: MockOptions) -> State {
        State {
            options,
            key_answers: Mutex::new(Vec::new()),
            record,
            requests: Mutex::new(Vec::new()),
            head_delay_ms: AtomicU64::new(0),
            models_fetches: AtomicUsize::new(0),
            requests_started: AtomicUsize::new(0),
            requests_answered: AtomicUsize::new(0),
            requests_abandoned: AtomicUsize::new(0),
            streams_started: AtomicUsize::new(0),
            streams_completed: AtomicUsize::new(0),
            streams_cancelled: AtomicUsize::new(0),
            stream_seq: AtomicU64::new(0),
            last_stream: Mutex::new(LastStream {
                id: 0,
                bytes: BytesMut::new(),
            }),
        }
    }
}

/// A running mock upstream. Dropping it stops the server (see [`Drop`]);
/// [`MockUpstream::shutdown`] does the same and waits for it.
pub struct MockUpstream {
    addr: SocketAddr,
    /// `https` or `http`.
    scheme: &'static str,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0` with recording on.
    ///
    /// # Panics
    ///
    /// If no port can be bound, which in a test is not worth handling.
    pub async fn start() -> MockUpstream {
        MockUpstream::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("mock-upstream: cannot bind 127.0.0.1:0")
    }

    /// Starts on `addr` with recording on.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        MockUpstream::spawn(addr, true, MockOptions::default(), None).await
    }

    /// Starts on `127.0.0.1:0` with recording on, serving as `options` say.
    ///
    /// # Panics
    ///
    /// If no port can be bound.
    pub async fn start_with(options: MockOptions) -> MockUpstream {
        MockUpstream::spawn(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            true,
            options,
            None,
        )
        .await
        .expect("mock-upstream: cannot bind 127.0.0.1:0")
    }

    /// Every later request made with `key` gets `status` with an OpenAI-style error body and
    /// `headers` (e.g. `retry-after`), whatever it asks for. It is still recorded.
    pub fn answer_key(&self, key: &str, status: u16, headers: &[(&str, &str)]) {
        let answer = KeyAnswer {
            status,
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        };
        let mut answers = self.state.key_answers.lock();
        answers.retain(|(known, _)| known != key);
        answers.push((key.to_string(), answer));
    }

    /// Every later request, whatever it asks for, waits `delay` after it was recorded before
    /// anything else happens (a key's fixed answer, `x-mock-delay-ms`, the response head);
    /// `Duration::ZERO` ends that. Requests already waiting keep their delay.
    pub fn delay_heads(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.head_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests made with `key` are answered as any other again.
    pub fn forget_key(&self, key: &str) {
        self.state
            .key_answers
            .lock()
            .retain(|(known, _)| known != key);
    }

    /// Starts on `addr` without keeping requests or stream bytes, for long
    /// benchmark runs. Counters still work; `requests()` stays empty and
    /// `last_stream_bytes()` stays `None`.
    pub async fn start_without_recording_on(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        MockUpstream::spawn(addr, false, MockOptions::default(), None).await
    }

    /// Starts on `addr` over HTTPS with `identity`'s certificate, offering `h2` and `http/1.1`
    /// by ALPN; recording as `record` says. `max_streams` is the HTTP/2 limit of concurrent
    /// streams per connection it advertises (`None`: no limit, so one connection can carry a
    /// whole benchmark).
    pub async fn start_tls_on(
        addr: SocketAddr,
        record: bool,
        identity: SelfSigned,
        max_streams: Option<u32>,
    ) -> std::io::Result<MockUpstream> {
        MockUpstream::spawn(
            addr,
            record,
            MockOptions::default(),
            Some((identity, max_streams)),
        )
        .await
    }

    async fn spawn(
        addr: SocketAddr,
        record: bool,
        options: MockOptions,
        tls: Option<(SelfSigned, Option<u32>)>,
    ) -> std::io::Result<MockUpstream> {
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(record, options));
        let routes = routes(state.clone());

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // A dropped sender means the handle is gone: stop as well.
        let stopped = async move {
            let _ = stop_rx.await;
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = match tls {
            None => tokio::spawn(
                warp::serve(routes)
                    .incoming(listener)
                    .graceful(stopped)
                    .run(),
            ),
            Some((identity, max_streams)) => {
                tokio::spawn(tls::serve(listener, identity, max_streams, routes, stopped))
            }
        };

        Ok(MockUpstream {
            addr,
            scheme,
            state,
            stop: Some(stop_tx),
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT` (`https://` in TLS mode), without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.requests.lock().last().cloned()
    }

    /// `GET /v1/models` requests served, whatever their status.
    pub fn models_fetches(&self) -> usize {
        self.state.models_fetches.load(Ordering::SeqCst)
    }

    /// Requests whose headers have arrived, counted before the body is read.
    pub fn requests_started(&self) -> usize {
        self.state.requests_started.load(Ordering::SeqCst)
    }

    /// Requests the handler produced a response for (for a stream: its
    /// head; the events follow, see [`MockUpstream::streams_completed`]).
    pub fn requests_answered(&self) -> usize {
        self.state.requests_answered.load(Ordering::SeqCst)
    }

    /// Requests dropped before a response was produced: the body was cut
    /// off or the client went away, for instance during `x-mock-delay-ms`.
    /// Once `requests_answered() + requests_abandoned()` equals
    /// `requests_started()`, nothing is in flight any more.
    pub fn requests_abandoned(&self) -> usize {
        self.state.requests_abandoned.load(Ordering::SeqCst)
    }

    pub fn streams_started(&self) -> usize {
        self.state.streams_started.load(Ordering::SeqCst)
    }

    /// Streams whose final `data: [DONE]` event was handed to the server.
    pub fn streams_completed(&self) -> usize {
        self.state.streams_completed.load(Ordering::SeqCst)
    }

    /// Streams dropped before their final event, i.e. the client went away.
    pub fn streams_cancelled(&self) -> usize {
        self.state.streams_cancelled.load(Ordering::SeqCst)
    }

    /// The bytes of the most recently started SSE body, as far as it has been
    /// produced (all events concatenated). `None` before any stream, or when
    /// recording is off.
    pub fn last_stream_bytes(&self) -> Option<Bytes> {
        let last = self.state.last_stream.lock();
        (last.id != 0).then(|| Bytes::copy_from_slice(&last.bytes))
    }

    /// Stops accepting, closes idle connections and waits (up to a few
    /// seconds) for in-flight responses to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }
}

/// The whole API as one filter, the same in plain and TLS mode.
fn routes(
    state: Arc<State>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone + Send + Sync + 'static {
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    // Taken before the body is read, so that a request whose body never
    // arrives in full still shows up, as started and then abandoned.
    let in_flight = warp::any().map(move || InFlight::start(state.clone()));
    // One catch-all filter that routes by hand: cheaper than a tree of
    // `or`s, and every request has to be recorded the same way anyway.
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(in_flight)
        .and(warp::body::bytes())
        .and(with_state)
        .then(handlers::handle)
}

/// One request from its headers on: counted as answered if the handler gets
/// to produce a response, as abandoned if it is dropped before that.
pub(crate) struct InFlight {
    state: Arc<State>,
    answered: bool,
}

impl InFlight {
    fn start(state: Arc<State>) -> InFlight {
        state.requests_started.fetch_add(1, Ordering::SeqCst);
        InFlight {
            state,
            answered: false,
        }
    }

    pub(crate) fn answered(mut self) {
        self.answered = true;
        self.state.requests_answered.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.answered {
            self.state.requests_abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for MockUpstream {
    /// Asks the server to stop without waiting: the listener closes and idle
    /// connections are shut once the server task runs again. Responses
    /// already in flight are allowed to finish. Use [`MockUpstream::shutdown`]
    /// when the port must be closed before going on.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds through `TcpSocket` rather than `TcpListener::bind` to set socket
/// options that warp gives no hook for: `TCP_NODELAY` (inherited by accepted
/// sockets on Linux) so small SSE events are not held back by Nagle, and
/// `SO_REUSEADDR` so the binary can be restarted on the same port at once.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    // Best effort: not every platform accepts it on a listening socket.
    let _ = socket.set_nodelay(true);
    socket.bind(addr)?;
    socket.listen(1024)
}
