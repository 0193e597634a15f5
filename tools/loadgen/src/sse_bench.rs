//! `loadgen sse`: the streaming load of `loadgen bench`.
//!
//! Keeps `--concurrency` HTTP/1.1 keep-alive connections busy, each sending
//! `POST /v1/chat/completions` with `"stream": true` and the mock's `x-mock-chunks` /
//! `x-mock-interval-ms` headers, one stream after another until `--duration` seconds have passed
//! (streams under way then run to their end; nothing new starts). Connections open staggered
//! over `--ramp` seconds so that neither the listen backlog nor one synchronized burst of events
//! every interval distorts the figures.
//!
//! Per stream: time to first chunk (request sent -> first complete SSE event), the gaps between
//! events and the worst one, and the event count (must be CHUNKS + 3: role, contents, finish,
//! `[DONE]`, the last one `data: [DONE]`). Times are taken when a body frame reaches this
//! task, so this process's own scheduling delay is inside every figure, the same for every
//! target ("direct" is the floor they are compared to). Anything else (non-2xx, a short or
//! malformed stream, a reset) is an error and ends that connection. One JSON object goes to
//! stdout at the end.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::rng::Rng;
use crate::sse::SseCounter;
use crate::sys;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A loopback address: the benchmark talks to nothing else.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Client token (default: $BENCH_CLIENT_TOKEN, which is how `loadgen bench` passes it, out of `ps`).
    #[arg(long)]
    token: Option<String>,
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds during which new streams start.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds over which connections open.
    #[arg(long, default_value_t = 1.0)]
    ramp: f64,
    /// Extra seconds before a connection's streams count as hung.
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    #[arg(long, default_value_t = 20)]
    chunks: u64,
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Sample this process's RSS while the load runs (repeatable; the sum is reported).
    #[arg(long = "pid")]
    pids: Vec<u32>,
}

/// Counts that each connection keeps on its own and that are added up at the end.
#[derive(Default, Debug, PartialEq)]
pub struct ConnStats {
    streams_ok: u64,
    events: u64,
    /// Failed streams' events too: what the proxy forwarded.
    events_all: u64,
    errors: u64,
    non_2xx: u64,
    error_kinds: BTreeMap<String, u64>,
}

impl ConnStats {
    fn error(&mut self, kind: impl Into<String>) {
        self.errors += 1;
        *self.error_kinds.entry(kind.into()).or_default() += 1;
    }

    fn merge(&mut self, other: ConnStats) {
        self.streams_ok += other.streams_ok;
        self.events += other.events;
        self.events_all += other.events_all;
        self.errors += other.errors;
        self.non_2xx += other.non_2xx;
        for (kind, n) in other.error_kinds {
            *self.error_kinds.entry(kind).or_default() += n;
        }
    }
}

/// Timing of successful streams only, in nanoseconds, shared by all connections (one set of
/// histograms per connection would cost megabytes at 1000 connections).
pub struct Timings {
    ttfc: Histogram<u64>,
    gaps: Histogram<u64>,
    worst_gap: Histogram<u64>,
    ttfc_max: u64,
    gap_max: u64,
}

impl Timings {
    fn new() -> Result<Self, hdrhistogram::CreationError> {
        // 1 ns .. 10 min at 3 significant digits.
        let h = || Histogram::new_with_bounds(1, 600_000_000_000, 3);
        Ok(Timings {
            ttfc: h()?,
            gaps: h()?,
            worst_gap: h()?,
            ttfc_max: 0,
            gap_max: 0,
        })
    }

    fn record_stream(&mut self, trace: &StreamTrace) {
        self.ttfc.saturating_record(trace.ttfc_ns.max(1));
        self.ttfc_max = self.ttfc_max.max(trace.ttfc_ns);
        for &gap in &trace.gaps_ns {
            self.gaps.saturating_record(gap.max(1));
        }
        let worst = trace.gaps_ns.iter().copied().max().unwrap_or(0);
        self.worst_gap.saturating_record(worst.max(1));
        self.gap_max = self.gap_max.max(worst);
    }
}

/// One stream's events as they arrive: counts them across frame boundaries and times them.
pub struct StreamTrace {
    sent: Instant,
    counter: SseCounter,
    prev: Option<Instant>,
    ttfc_ns: u64,
    gaps_ns: Vec<u64>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl StreamTrace {
    pub fn new(sent: Instant) -> Self {
        StreamTrace {
            sent,
            counter: SseCounter::default(),
            prev: None,
            ttfc_ns: 0,
            gaps_ns: Vec::new(),
        }
    }

    /// Feeds one body frame that arrived at `at`; returns the events it completed.
    pub fn feed(&mut self, data: &[u8], at: Instant) -> u64 {
        let completed = self.counter.feed(data);
        for _ in 0..completed {
            match self.prev {
                None => self.ttfc_ns = nanos(at.saturating_duration_since(self.sent)),
                Some(prev) => self.gaps_ns.push(nanos(at.saturating_duration_since(prev))),
            }
            self.prev = Some(at);
        }
        completed
    }

    /// None for a stream that is what it should be, else the error kind.
    pub fn verdict(&self, expected_events: u64) -> Option<String> {
        let events = self.counter.events();
        if events != expected_events {
            Some(format!("events_{events}_of_{expected_events}"))
        } else if self.counter.last_event() != b"data: [DONE]" {
            Some("no_done".into())
        } else if !self.counter.trailing().is_empty() {
            Some("trailing_bytes".into())
        } else {
            None
        }
    }
}

/// Counts the bytes read off the socket (headers and chunk framing included, as on the wire).
struct Counting {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

struct Target {
    addr: SocketAddr,
    host_port: String,
    path: String,
    token: String,
    body: Bytes,
    chunks: u64,
    interval_ms: u64,
    expected_events: u64,
}

impl Target {
    fn request(&self) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
        let mut builder = Request::builder()
            .method("POST")
            .uri(&self.path)
            .header("host", &self.host_port)
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .header("x-mock-chunks", self.chunks)
            .header("x-mock-interval-ms", self.interval_ms);
        if !self.token.is_empty() {
            builder = builder.header("authorization", format!("Bearer {}", self.token));
        }
        builder.body(Full::new(self.body.clone()))
    }
}

fn hyper_error_kind(err: &hyper::Error) -> &'static str {
    if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
        "connection_lost"
    } else if err.is_parse() {
        "bad_response"
    } else {
        "reset"
    }
}

fn lock(timings: &Mutex<Timings>) -> std::sync::MutexGuard<'_, Timings> {
    timings
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Streams back to back on one connection until `deadline`; stops at the first error, as a
/// client would drop a connection it no longer trusts.
async fn streams(
    target: &Target,
    sender: &mut http1::SendRequest<Full<Bytes>>,
    deadline: Instant,
    timings: &Mutex<Timings>,
    stats: &mut ConnStats,
) {
    loop {
        if sender.ready().await.is_err() {
            return; // closed by the server between streams: not an error of any stream
        }
        let request = match target.request() {
            Ok(request) => request,
            Err(_) => return stats.error("bad_request"),
        };
        let sent = Instant::now();
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => return stats.error(hyper_error_kind(&err)),
        };
        let status = response.status();
        if !status.is_success() {
            stats.non_2xx += 1;
            return stats.error(format!("status_{}", status.as_u16()));
        }
        let chunked = response
            .headers()
            .get_all("transfer-encoding")
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
            });
        if !chunked {
            return stats.error("not_chunked");
        }
        let mut body = response.into_body();
        let mut trace = StreamTrace::new(sent);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        stats.events_all += trace.feed(&data, Instant::now());
                    }
                }
                Err(err) => return stats.error(hyper_error_kind(&err)),
            }
        }
        match trace.verdict(target.expected_events) {
            Some(kind) => return stats.error(kind),
            None => {
                stats.streams_ok += 1;
                stats.events += trace.counter.events();
                lock(timings).record_stream(&trace);
            }
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}

async fn connection(
    target: Arc<Target>,
    timings: Arc<Mutex<Timings>>,
    bytes: Arc<AtomicU64>,
    open_at: Instant,
    deadline: Instant,
    hung_after: Duration,
) -> ConnStats {
    let mut stats = ConnStats::default();
    tokio::time::sleep_until(open_at.into()).await;
    let stream = match TcpStream::connect(target.addr).await {
        Ok(stream) => stream,
        Err(err) => {
            stats.error(format!("connect_{:?}", err.kind()));
            return stats;
        }
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Counting {
        inner: stream,
        read: bytes,
    });
    let (mut sender, conn) = match http1::handshake(io).await {
        Ok(pair) => pair,
        Err(err) => {
            stats.error(format!("handshake_{}", hyper_error_kind(&err)));
            return stats;
        }
    };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let run = streams(&target, &mut sender, deadline, &timings, &mut stats);
    if tokio::time::timeout(hung_after, run).await.is_err() {
        stats.error("timeout");
    }
    drop(sender);
    driver.abort();
    stats
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Ttfc {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Gaps {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub worst_per_stream_p50: Option<f64>,
}

/// The one JSON object `loadgen sse` prints, which `loadgen bench` reads back.
#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    pub concurrency: usize,
    pub chunks: u64,
    pub interval_ms: u64,
    pub duration_s: f64,
    pub streams_ok: u64,
    pub events: u64,
    pub events_all: u64,
    pub content_chunks: u64,
    pub bytes: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub ttfc_us: Ttfc,
    pub gap_ms: Gaps,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_util: Option<f64>,
    pub peak_rss_sampled_kb: Option<u64>,
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn quantile(h: &Histogram<u64>, q: f64, scale: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / scale)
}

async fn load(args: &Args, token: String) -> Result<Report, String> {
    let body = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello in twenty words."}]}"#;
    let target = Arc::new(Target {
        addr: SocketAddr::new(args.host, args.port),
        host_port: SocketAddr::new(args.host, args.port).to_string(),
        path: args.path.clone(),
        token,
        body: Bytes::from_static(body),
        chunks: args.chunks,
        interval_ms: args.interval_ms,
        expected_events: args.chunks + 3,
    });
    let timings = Arc::new(Mutex::new(Timings::new().map_err(|e| e.to_string())?));
    let bytes = Arc::new(AtomicU64::new(0));

    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = (!args.pids.is_empty()).then(|| {
        let (pids, peak) = (args.pids.clone(), peak_rss.clone());
        tokio::spawn(async move {
            loop {
                let total: u64 = pids.iter().map(|&pid| sys::rss_kb(pid)).sum();
                peak.fetch_max(total, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    let cpu0 = sys::cpu_time();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let hung_after = Duration::from_secs_f64(args.duration + args.grace);
    let mut rng = Rng::new(42);
    let mut set = JoinSet::new();
    for _ in 0..args.concurrency {
        let open_at = start + Duration::from_secs_f64(rng.unit() * args.ramp);
        set.spawn(connection(
            target.clone(),
            timings.clone(),
            bytes.clone(),
            open_at,
            deadline,
            hung_after,
        ));
    }
    let mut stats = ConnStats::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(one) => stats.merge(one),
            Err(err) => stats.error(format!("task_{err}")),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = sys::cpu_time().saturating_sub(cpu0).as_secs_f64();
    if let Some(sampler) = sampler {
        sampler.abort();
    }

    let t = lock(&timings);
    let has_gaps = !t.gaps.is_empty();
    Ok(Report {
        concurrency: args.concurrency,
        chunks: args.chunks,
        interval_ms: args.interval_ms,
        duration_s: round3(wall),
        streams_ok: stats.streams_ok,
        events: stats.events,
        events_all: stats.events_all,
        content_chunks: stats.streams_ok * args.chunks,
        bytes: bytes.load(Ordering::Relaxed),
        errors: stats.errors,
        non_2xx: stats.non_2xx,
        ttfc_us: Ttfc {
            p50: quantile(&t.ttfc, 0.50, 1e3),
            p90: quantile(&t.ttfc, 0.90, 1e3),
            p99: quantile(&t.ttfc, 0.99, 1e3),
            max: (!t.ttfc.is_empty()).then(|| t.ttfc_max as f64 / 1e3),
        },
        gap_ms: Gaps {
            p50: quantile(&t.gaps, 0.50, 1e6),
            p99: quantile(&t.gaps, 0.99, 1e6),
            p999: quantile(&t.gaps, 0.999, 1e6),
            max: has_gaps.then(|| t.gap_max as f64 / 1e6),
            worst_per_stream_p50: quantile(&t.worst_gap, 0.50, 1e6).filter(|_| has_gaps),
        },
        error_kinds: stats.error_kinds,
        loadgen_cpu_s: round3(cpu),
        loadgen_cpu_util: (wall > 0.0).then(|| round3(cpu / wall)),
        peak_rss_sampled_kb: (!args.pids.is_empty()).then(|| peak_rss.load(Ordering::Relaxed)),
    })
}

pub fn main(args: Args, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if !args.host.is_loopback() {
        eprintln!(
            "loadgen sse: error: refusing to target {}: loopback addresses only",
            args.host
        );
        return ExitCode::from(2);
    }
    if args.concurrency == 0 || !(args.duration > 0.0 && args.ramp >= 0.0 && args.grace >= 0.0) {
        eprintln!(
            "loadgen sse: error: --concurrency and --duration must be positive, --ramp and --grace not negative"
        );
        return ExitCode::from(2);
    }
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("BENCH_CLIENT_TOKEN").ok())
        .unwrap_or_default();
    sys::raise_nofile(Some(args.concurrency as u64 + 64));
    match runtime
        .block_on(load(&args, token))
        .and_then(|r| serde_json::to_string(&r).map_err(|e| e.to_string()))
    {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("loadgen sse: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: u64) -> Vec<u8> {
        let mut s = b"data: {\"role\":\"assistant\"}\n\n".to_vec();
        for i in 0..chunks {
            s.extend_from_slice(format!("data: {{\"c\":{i}}}\n\n").as_bytes());
        }
        s.extend_from_slice(b"data: {\"finish\":\"stop\"}\n\ndata: [DONE]\n\n");
        s
    }

    #[test]
    fn events_split_over_frames_are_timed_when_they_complete() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut trace = StreamTrace::new(t0);
        let bytes = stream(2);
        // The first event is complete only in the second frame.
        assert_eq!(trace.feed(&bytes[..10], at(1)), 0);
        assert_eq!(trace.feed(&bytes[10..40], at(5)), 1);
        assert_eq!(trace.feed(&bytes[40..], at(12)), 4);
        assert_eq!(trace.ttfc_ns, 5_000_000);
        assert_eq!(trace.gaps_ns, vec![7_000_000, 0, 0, 0]);
        assert_eq!(trace.verdict(5), None);
    }

    #[test]
    fn verdicts() {
        let now = Instant::now();
        let mut short = StreamTrace::new(now);
        short.feed(&stream(1), now);
        assert_eq!(short.verdict(5).as_deref(), Some("events_4_of_5"));
        let mut no_done = StreamTrace::new(now);
        no_done.feed(b"data: a\n\ndata: b\n\n", now);
        assert_eq!(no_done.verdict(2).as_deref(), Some("no_done"));
        let mut trailing = StreamTrace::new(now);
        trailing.feed(b"data: a\n\ndata: [DONE]\n\nx", now);
        assert_eq!(trailing.verdict(2).as_deref(), Some("trailing_bytes"));
    }

    #[test]
    fn stats_add_up() {
        let mut a = ConnStats::default();
        a.error("reset");
        a.streams_ok = 2;
        let mut b = ConnStats::default();
        b.error("reset");
        b.error("status_502");
        b.non_2xx = 1;
        a.merge(b);
        assert_eq!((a.errors, a.non_2xx, a.streams_ok), (3, 1, 2));
        assert_eq!(a.error_kinds.get("reset"), Some(&2));
    }

    #[test]
    fn timings_keep_exact_maxima() {
        let mut t = Timings::new().unwrap();
        let now = Instant::now();
        let mut trace = StreamTrace::new(now);
        trace.ttfc_ns = 1_234_567;
        trace.gaps_ns = vec![10, 50_000_001, 30];
        t.record_stream(&trace);
        assert_eq!((t.ttfc_max, t.gap_max), (1_234_567, 50_000_001));
        assert_eq!(t.gaps.len(), 3);
        assert_eq!(t.worst_gap.len(), 1);
    }
}
