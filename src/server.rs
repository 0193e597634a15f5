//! The accept loop: our own rather than `warp::serve`, to set `TCP_NODELAY` on every connection
//! (streamed chunks are small writes that Nagle's algorithm would hold back), to bound the drain
//! on shutdown, and to write one access line per request.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::Either;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use warp::http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};

use crate::error::json_error;

use crate::filters::routes;
use crate::state::AppState;

/// Largest request header section hyper buffers before answering 431, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Counts shutdown requests (SIGTERM, Ctrl-C, or a test): the first starts the drain, the second
/// ends it at once.
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<u32>>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_modify(|requests| *requests += 1);
    }
}

pub struct ShutdownSignal(watch::Receiver<u32>);

impl ShutdownSignal {
    async fn requested(&mut self, times: u32) {
        if self
            .0
            .wait_for(|requests| *requests >= times)
            .await
            .is_err()
        {
            // Every trigger is gone: nobody can ask any more, so this never resolves.
            std::future::pending::<()>().await;
        }
    }
}

pub fn shutdown_channel() -> (ShutdownTrigger, ShutdownSignal) {
    let (sender, receiver) = watch::channel(0);
    (ShutdownTrigger(Arc::new(sender)), ShutdownSignal(receiver))
}

/// Serves the proxy on `listener` until the first shutdown request, then stops accepting, closes
/// idle keep-alive connections, and lets in-flight requests and streams finish for at most
/// `SHUTDOWN_GRACE_SECS` or until a second shutdown request; whatever remains is then closed.
pub async fn serve(listener: TcpListener, state: AppState, mut shutdown: ShutdownSignal) {
    let limits = state.config.limits.clone();
    let in_flight = Arc::new(Semaphore::new(limits.max_concurrent_requests));
    let service = TowerToHyperService::new(warp::service(routes(state)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(err) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    log::error!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.requested(1) => break,
        };
        // Reap finished connection tasks so the set only holds live connections.
        while connections.try_join_next().is_some() {}
        if let Err(err) = stream.set_nodelay(true) {
            log::debug!("could not set TCP_NODELAY: {err}");
        }
        let service = service.clone();
        let in_flight = in_flight.clone();
        let per_request = hyper::service::service_fn(move |request: Request<Incoming>| {
            let record = AccessRecord::start(&request);
            let mut permit = None;
            let refusal = if request.method() == Method::CONNECT {
                Some(refuse_connect())
            } else {
                match in_flight.clone().try_acquire_owned() {
                    Ok(acquired) => {
                        permit = Some(acquired);
                        None
                    }
                    Err(_) => Some(overloaded()),
                }
            };
            let response = match refusal {
                Some(refusal) => Either::Left(std::future::ready(Ok(refusal))),
                None => Either::Right(service.call(request)),
            };
            async move {
                let response: Response<_> = response.await?;
                let record = record.for_response(&response);
                Ok::<_, Infallible>(response.map(|body| AccessLogBody {
                    inner: body,
                    record,
                    _permit: permit,
                }))
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), per_request)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(err) = connection.await {
                log::debug!("connection ended with an error: {err}");
            }
        });
    }

    drop(listener);
    log::info!(
        "shutting down: no new connections; idle ones close now, in-flight requests get up to {}s \
         (open connections: {})",
        limits.shutdown_grace.as_secs(),
        connections.len()
    );
    tokio::select! {
        () = graceful.shutdown() => log::info!("all connections drained"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            log::warn!("shutdown grace period over: closing {} connections", connections.len());
        }
        () = shutdown.requested(2) => {
            log::warn!("second shutdown request: closing {} connections", connections.len());
        }
    }
    connections.shutdown().await;
}

fn refuse_connect() -> warp::reply::Response {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "CONNECT is not supported: this is not a forward proxy",
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Answered at once, without queueing: a client that is told to retry later can go elsewhere.
fn overloaded() -> warp::reply::Response {
    let mut response = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "Too many requests in flight; retry shortly",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// What the access line says about one request; written when the response body is dropped,
/// which is when the last byte went out or the client went away.
struct AccessRecord {
    id: u64,
    method: Method,
    uri: Uri,
    status: StatusCode,
    started: Instant,
    first_byte: Option<Duration>,
    bytes: u64,
    /// hyper stops polling a body once it has written a declared `Content-Length`, so reaching
    /// that length counts as complete even though the end of the body is never polled.
    declared_length: Option<u64>,
    completed: bool,
    failed: bool,
}

impl AccessRecord {
    fn start<B>(request: &Request<B>) -> AccessRecord {
        AccessRecord {
            id: NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed),
            method: request.method().clone(),
            uri: request.uri().clone(),
            status: StatusCode::OK,
            started: Instant::now(),
            first_byte: None,
            bytes: 0,
            declared_length: None,
            completed: false,
            failed: false,
        }
    }

    fn for_response<B: Body>(mut self, response: &Response<B>) -> AccessRecord {
        self.status = response.status();
        self.declared_length = response
            .headers()
            .get(warp::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok())
            .or_else(|| response.body().size_hint().exact());
        self
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let outcome = if self.completed
            || self.declared_length == Some(self.bytes)
            || self.method == Method::HEAD
        {
            "complete"
        } else if self.failed {
            "upstream_failed"
        } else {
            "client_gone"
        };
        let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
        // The path only: query strings are the caller's business and may carry secrets.
        // `ttfb_ms=-` when no body byte was ever sent.
        let ttfb = self
            .first_byte
            .map_or_else(|| "-".to_string(), |ttfb| format!("{:.1}", millis(ttfb)));
        log::info!(
            "{} {} status={} duration_ms={:.1} ttfb_ms={} bytes={} outcome={} req={:x}",
            self.method,
            self.uri.path(),
            self.status.as_u16(),
            millis(self.started.elapsed()),
            ttfb,
            self.bytes,
            outcome,
            self.id,
        );
    }
}

/// A response body that counts what passes through it for the access line, untouched.
struct AccessLogBody<B> {
    inner: B,
    record: AccessRecord,
    /// A place in `MAX_CONCURRENT_REQUESTS`, given back when the last byte went out.
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B> Body for AccessLogBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let record = &mut this.record;
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    record.bytes += data.len() as u64;
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
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
