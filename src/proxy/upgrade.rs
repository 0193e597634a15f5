//! WebSocket tunnels (the Realtime API at `GET /v1/realtime`): the upgrade request is authorised
//! like any other `/v1` request, forwarded with its upgrade headers and the key swapped in, and
//! once the upstream answers 101 the two connections are joined byte for byte, not re-framed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Reply;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::Upstream;
use super::headers::{request_headers, response_headers};
use super::request::RequestBody;
use super::response::Forwarded;
use crate::error::ProxyError;
use crate::vocab::Endpoint;

const READ_BUFFER: usize = 16 * 1024;

/// The upstream's 101, kept in the response's extensions until the server has the caller's
/// upgraded connection to join it with.
#[derive(Clone)]
pub struct PendingTunnel(Arc<Mutex<Option<reqwest::Response>>>);

impl PendingTunnel {
    pub fn take(&self) -> Option<reqwest::Response> {
        self.0.lock().take()
    }
}

/// What a tunnel keeps until it ends, such as the client's place under its concurrency limit;
/// carried in the 101's extensions to the server that runs the tunnel.
#[derive(Clone)]
pub struct TunnelHold(Arc<Mutex<Option<Box<dyn Send + Sync>>>>);

impl TunnelHold {
    pub fn new(held: impl Send + Sync + 'static) -> TunnelHold {
        TunnelHold(Arc::new(Mutex::new(Some(Box::new(held)))))
    }

    /// Takes what is held; dropping it gives it back.
    pub fn take(&self) -> Option<Box<dyn Send + Sync>> {
        self.0.lock().take()
    }
}

impl Upstream {
    /// Sends the upgrade request upstream. A 101 becomes the caller's 101 (with a
    /// `PendingTunnel`); any other answer, a refusal of the upgrade, is passed through as is.
    pub async fn open_tunnel(
        &self,
        headers: HeaderMap,
        endpoint: &Endpoint,
        path: &str,
        query: Option<&str>,
    ) -> Result<Forwarded, ProxyError> {
        let url = self.url(endpoint, path, query)?;
        let upgrade = headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("websocket"));
        let mut headers = request_headers(headers, &self.0.caller_token_header, &self.0.key_header);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
        let client = self.0.tunnel_client.get().map_err(|err| {
            log::error!("upstream {}: {}", self.0.name, err.message);
            ProxyError::BadGateway
        })?;
        // Through the key pool like any request: an upgrade has no body, so a key answered 429
        // is rested and the next one tried.
        let mut answer = self
            .send_alone(client, &Method::GET, url, headers, RequestBody::None)
            .await?;
        if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(self.into_reply(answer, None).await);
        }
        let mut headers =
            response_headers(std::mem::take(answer.headers_mut()), self.keys_to_mask());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut response = warp::reply::Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.headers_mut() = headers;
        response
            .extensions_mut()
            .insert(PendingTunnel(Arc::new(Mutex::new(Some(answer)))));
        Ok(Forwarded {
            response: response.into_response(),
            stream: false,
        })
    }
}

/// Every open tunnel: the drain waits for them as it waits for connections, and closes what is
/// left at the end of the grace period. Cloning is shallow.
#[derive(Clone, Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    close: CancellationToken,
}

/// How a tunnel ended, for its access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their connection.
    Closed,
    /// Neither side sent anything for `STREAM_IDLE_TIMEOUT_SECS`.
    Idle,
    /// A connection broke, or an upgrade never completed.
    Failed,
    /// Still open at the end of the drain's grace period.
    Drained,
}

impl TunnelEnd {
    /// The access line's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Idle => "idle",
            TunnelEnd::Failed => "failed",
            TunnelEnd::Drained => "drained",
        }
    }
}

/// What a tunnel moved, each way.
#[derive(Debug, Default)]
pub struct TunnelBytes {
    pub to_upstream: AtomicU64,
    pub to_caller: AtomicU64,
}

impl Tunnels {
    /// Joins the caller's upgraded connection with the upstream's, in a task of its own;
    /// `finished` is called once with how it ended and what it moved.
    pub fn open<F>(
        &self,
        caller: hyper::upgrade::OnUpgrade,
        upstream: reqwest::Response,
        idle: Duration,
        finished: F,
    ) where
        F: FnOnce(TunnelEnd, &TunnelBytes) + Send + 'static,
    {
        let close = self.close.clone();
        self.tracker.spawn(async move {
            let bytes = TunnelBytes::default();
            let end = tokio::select! {
                end = join(caller, upstream, idle, &bytes) => end,
                () = close.cancelled() => TunnelEnd::Drained,
            };
            finished(end, &bytes);
        });
    }

    /// No new tunnels from now on; `wait` then resolves once the open ones have ended.
    pub fn stop_accepting(&self) {
        self.tracker.close();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Ends every open tunnel and waits for their access lines.
    pub async fn close_all(&self) {
        self.close.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn open_count(&self) -> usize {
        self.tracker.len()
    }
}

async fn join(
    caller: hyper::upgrade::OnUpgrade,
    upstream: reqwest::Response,
    idle: Duration,
    bytes: &TunnelBytes,
) -> TunnelEnd {
    let (caller, upstream) = match tokio::join!(caller, upstream.upgrade()) {
        (Ok(caller), Ok(upstream)) => (hyper_util::rt::TokioIo::new(caller), upstream),
        (Err(err), _) => {
            log::info!("the caller's upgrade did not complete: {err}");
            return TunnelEnd::Failed;
        }
        (_, Err(err)) => {
            log::error!("the upstream's upgrade did not complete: {err}");
            return TunnelEnd::Failed;
        }
    };
    let activity = Activity::new();
    let (caller_read, caller_write) = tokio::io::split(caller);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    // The upstream's end is the tunnel's end: a WebSocket server closes the TCP connection
    // first after the close handshake (RFC 6455 7.1.1), and a caller that keeps its end open
    // has nothing left to talk to. The caller's end only closes the way up and waits for the
    // upstream to finish.
    let up = pump(caller_read, upstream_write, &bytes.to_upstream, &activity);
    let down = pump(upstream_read, caller_write, &bytes.to_caller, &activity);
    tokio::pin!(up, down);
    let both = async {
        tokio::select! {
            ended = &mut down => ended,
            ended = &mut up => match ended {
                Ok(()) => down.await,
                Err(err) => Err(err),
            },
        }
    };
    tokio::select! {
        joined = both => match joined {
            Ok(()) => TunnelEnd::Closed,
            Err(err) => {
                log::debug!("tunnel connection broke: {err}");
                TunnelEnd::Failed
            }
        },
        () = activity.silent_for(idle) => {
            log::info!("closed a WebSocket tunnel silent for {}s (STREAM_IDLE_TIMEOUT_SECS)", idle.as_secs());
            TunnelEnd::Idle
        }
    }
}

/// Copies one direction until its end, then closes the other side's write half so that the
/// peer sees the end too; bytes are passed on as read, never re-framed.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    moved: &AtomicU64,
    activity: &Activity,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; READ_BUFFER];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buffer[..read]).await?;
        to.flush().await?;
        moved.fetch_add(read as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// When either direction last moved a byte, as milliseconds since the tunnel opened.
struct Activity {
    opened: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`; sleeps until the earliest moment that could
    /// be true rather than polling.
    async fn silent_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let due = self.opened + last + idle;
            if due <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}
