//! The accept loop: our own rather than `warp::serve`, to set `TCP_NODELAY` on every connection
//! (streamed chunks are small writes that Nagle's algorithm would hold back), to bound the drain
//! on shutdown, to refuse work beyond `MAX_CONCURRENT_REQUESTS`, and to hang the access log and
//! request ids on every request.

mod admission;
pub mod descriptors;
pub mod listener;
mod shutdown;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::Either;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use warp::http::{Request, Response};

use crate::ops::access::{AccessRecord, RequestTap, ResponseTap, Tapped};
use crate::ops::request_id::{PROXY_REQUEST_ID, REQUEST_ID, request_id};
use crate::proxy::upgrade::{PendingTunnel, TunnelHold, Tunnels};
use crate::routes::routes;
use crate::state::AppState;
use crate::vocab::classify;
use crate::vocab::endpoint::{Shape, Target};
use crate::vocab::websocket::is_websocket_upgrade;
use admission::Admission;
pub use shutdown::{ShutdownSignal, ShutdownTrigger, shutdown_channel};

/// Largest request header section hyper buffers before answering 431, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves the proxy on `listener` until the first shutdown request, then stops accepting, closes
/// idle keep-alive connections, and lets in-flight requests and streams finish for at most
/// `SHUTDOWN_GRACE_SECS` or until a second shutdown request; whatever remains is then closed.
pub async fn serve(listener: TcpListener, state: AppState, mut shutdown: ShutdownSignal) {
    let limits = state.config.limits.clone();
    let admission = Admission::new(limits.max_concurrent_requests);
    let service = TowerToHyperService::new(warp::service(routes(state.clone())));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let graceful = GracefulShutdown::new();
    let tunnels = Tunnels::default();
    let mut connections = JoinSet::new();

    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(err) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error. The
                    // connection waits in the backlog meanwhile; it is not lost.
                    if crate::vocab::descriptors::is_out_of_descriptors(&err) {
                        log::error!(
                            "accept failed: out of file descriptors (a local resource limit); \
                             retrying in 100 ms"
                        );
                    } else {
                        log::error!("accept failed: {err}");
                    }
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
        let admission = admission.clone();
        let state = state.clone();
        let tunnels = tunnels.clone();
        let per_request = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let id = request_id(request.headers());
            // Taken before the request moves on: only this layer can hand the caller's
            // connection to a tunnel once the upstream agreed to the upgrade.
            let caller_upgrade = is_websocket_upgrade(request.method(), request.headers())
                .then(|| hyper::upgrade::on(&mut request));
            // The one classification of the request: admission, the access record and every
            // route after them read it, from the request's extensions.
            let endpoint = classify(
                request.method(),
                request.uri().path(),
                Shape::of(request.method(), request.headers()),
            );
            let route = endpoint.route;
            let query = request.uri().query().map(str::to_owned);
            request.extensions_mut().insert(Target { endpoint, query });
            let (record, bytes_in) = AccessRecord::start(
                &request,
                route,
                id.clone(),
                state.metrics.clone(),
                state.config.log_format,
            );
            let mut request = request.map(|body| Tapped::new(body, RequestTap(bytes_in)));
            // The upstream gets the same id, through the ordinary header forwarding.
            request.headers_mut().insert(REQUEST_ID, id);
            let (response, permit) = match admission.admit(request.method(), route) {
                Ok(permit) => (Either::Right(service.call(request)), permit),
                Err(refusal) => (
                    Either::Left(std::future::ready(Ok(
                        refusal.into_response(state.config.error_format)
                    ))),
                    None,
                ),
            };
            let tunnels = tunnels.clone();
            let idle = state.config.limits.stream_idle_timeout;
            // Boxed per request: hyper keeps the slot for a connection's in-flight future (sized
            // for the future, about 6.7 KiB with warp's inside) allocated for the life of the
            // connection, so a boxed one leaves it a pointer while a stream runs.
            let answered: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Response<_>, Infallible>> + Send>,
            > = Box::pin(async move {
                let mut response: Response<_> = response.await?;
                let record = record.for_response(&response);
                response
                    .headers_mut()
                    .insert(PROXY_REQUEST_ID, record.id().clone());
                let pending = response.extensions_mut().remove::<PendingTunnel>();
                let held = response
                    .extensions_mut()
                    .remove::<TunnelHold>()
                    .and_then(|hold| hold.take());
                let mut tap = ResponseTap {
                    record: Some(record),
                    permit,
                };
                if let (Some(caller), Some(upstream)) =
                    (caller_upgrade, pending.and_then(|pending| pending.take()))
                {
                    // The access line and the place in MAX_CONCURRENT_REQUESTS now last as long
                    // as the tunnel.
                    let (record, permit) = (tap.record.take(), tap.permit.take());
                    tunnels.open(caller, upstream, idle, move |end, bytes| {
                        let _places = (permit, held);
                        if let Some(mut record) = record {
                            record.tunnel_ended(
                                bytes.to_upstream.load(Ordering::Relaxed),
                                bytes.to_caller.load(Ordering::Relaxed),
                                end.as_str(),
                            );
                        }
                    });
                }
                Ok::<_, Infallible>(response.map(|body| Tapped::new(body, tap)))
            });
            answered
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), per_request)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(err) = connection.await {
                log_connection_error(&*err);
            }
        });
    }

    drop(listener);
    state.begin_draining();
    log::info!(
        "shutting down: no new connections; idle ones close now, in-flight requests get up to {}s \
         (open connections: {})",
        limits.shutdown_grace.as_secs(),
        connections.len()
    );
    // Upgraded connections have left hyper's watch: the drain waits for their tunnels too.
    tunnels.stop_accepting();
    let drained = async {
        graceful.shutdown().await;
        tunnels.wait().await;
    };
    tokio::select! {
        () = drained => log::info!("all connections drained"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            log::warn!(
                "shutdown grace period over: closing {} connections and {} WebSocket tunnels",
                connections.len(),
                tunnels.open_count()
            );
        }
        () = shutdown.requested(2) => {
            log::warn!(
                "second shutdown request: closing {} connections and {} WebSocket tunnels",
                connections.len(),
                tunnels.open_count()
            );
        }
    }
    tunnels.close_all().await;
    connections.shutdown().await;
}

/// Requests hyper refused before they reached the route table (malformed or oversized headers,
/// a header read timeout) have no access line, so they are logged here.
fn log_connection_error(err: &(dyn std::error::Error + 'static)) {
    match err.downcast_ref::<hyper::Error>() {
        Some(err) if err.is_parse_too_large() => {
            log::info!("refused a request: header section too large (431)");
        }
        Some(err) if err.is_parse() => log::info!("refused a malformed request (400): {err}"),
        // Debug only: an idle keep-alive connection ends the same way, every time.
        Some(err) if err.is_timeout() => {
            log::debug!("closed a connection idle or slow past HEADER_READ_TIMEOUT_SECS");
        }
        _ => log::debug!("connection ended with an error: {err}"),
    }
}
