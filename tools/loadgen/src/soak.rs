//! `loadgen soak`: the mixed load of scripts/soak.sh, where every request has an expected answer.
//!
//! Each worker has at most one request in flight and picks the next kind from a fixed weighted
//! mix until `--seconds` pass (or `--max-requests` have started); requests under way then finish,
//! each bounded by `--timeout`. Kinds a real client sends on a kept connection go through hyper's
//! HTTP/1.1 client (one connection per worker, dropped after KEEPALIVE_IDLE idle, before the
//! proxy would drop it); the others are raw bytes on a fresh socket (see `http`).
//!
//! | kind       | request                                         | expected                         |
//! |------------|-------------------------------------------------|----------------------------------|
//! | plain      | POST /v1/chat/completions                       | 200, JSON with non-empty choices |
//! | stream     | same with "stream": true                        | 200, every event, `[DONE]` last  |
//! | cancelled  | a 10 s stream, dropped after 1-3 events         | 200 and the events, then RST/FIN |
//! | over_decl  | Content-Length > MAX_BODY_BYTES (no body, 16 kB | 413 `payload_too_large`          |
//! |            | of it, or `Expect: 100-continue`)               |                                  |
//! | over_chunk | chunked body > MAX_BODY_BYTES                   | 413 `payload_too_large`          |
//! | no_token   | POST/GET without or with a bad token            | 401 `unauthorized`               |
//! | malformed  | two Content-Lengths, garbage, colon-less header | 400, then the connection closes  |
//! | models     | GET /v1/models                                  | 200, JSON with "data"            |
//!
//! A request is lost when it times out, gets no (or a cut-off) answer, a wrong status or a body
//! that does not match.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::http::{HttpReader, Lost, Response, excerpt, io_lost, raw_request, tail};
use crate::rng::Rng;
use crate::sse::SseCounter;
use crate::sys;

const ONLY_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Plain,
    Stream,
    Cancelled,
    OverDecl,
    OverChunk,
    NoToken,
    Malformed,
    Models,
}

/// The mix, in the order of the report; weights are relative.
pub const MIX: [(Kind, u64); 8] = [
    (Kind::Plain, 30),
    (Kind::Stream, 18),
    (Kind::Cancelled, 10),
    (Kind::OverDecl, 7),
    (Kind::OverChunk, 6),
    (Kind::NoToken, 10),
    (Kind::Malformed, 7),
    (Kind::Models, 12),
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Stream => "stream",
            Kind::Cancelled => "cancelled",
            Kind::OverDecl => "over_decl",
            Kind::OverChunk => "over_chunk",
            Kind::NoToken => "no_token",
            Kind::Malformed => "malformed",
            Kind::Models => "models",
        }
    }

    fn index(self) -> usize {
        MIX.iter().position(|(k, _)| *k == self).unwrap_or(0)
    }
}

const STREAM_CHUNKS: u64 = 20;
/// role + content events + finish + `[DONE]`.
const STREAM_EVENTS: u64 = STREAM_CHUNKS + 3;
const STREAM_INTERVAL_MS: u64 = 2;
/// 2000 x 5 ms = 10 s: long enough that the client always cuts it.
const CANCEL_CHUNKS: u64 = 2000;
const CANCEL_INTERVAL_MS: u64 = 5;
/// Below the proxy's HEADER_READ_TIMEOUT_SECS, which also bounds how long it keeps an idle
/// connection: reusing one it is about to close would be a race the proxy cannot win.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(4);
/// Lost requests kept in full per kind (in the JSON), and how many of them are printed.
const MAX_SAMPLES: usize = 8;
const PRINTED_SAMPLES: usize = 3;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Must be 127.0.0.1: the soak talks to nothing else.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    #[arg(long)]
    token: String,
    /// The proxy's MAX_BODY_BYTES.
    #[arg(long)]
    max_body: u64,
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Per request, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Cap on requests started.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "soak")]
    label: String,
    /// Proxy PID: progress lines show its RSS and fds, and the run stops if it exits.
    #[arg(long, default_value_t = 0)]
    pid: u32,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 10.0)]
    progress: f64,
    /// Also write the summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only wait until a chat request works (retried up to --timeout).
    #[arg(long)]
    ready: bool,
    /// Only send WORKERS overlapping plain requests (leaves one pooled upstream connection each).
    #[arg(long)]
    fill: bool,
    #[arg(long, default_value_t = 300)]
    fill_delay_ms: u64,
}

// ----- result accounting ---------------------------------------------------------------------

#[derive(Serialize, Clone, Debug)]
pub struct Sample {
    at: String,
    reason: String,
    detail: String,
    after_s: f64,
}

struct KindTally {
    sent: u64,
    ok: u64,
    lost: u64,
    latency_sum: Duration,
    latency_max: Duration,
    /// Microseconds.
    latency: Option<Histogram<u64>>,
    reasons: BTreeMap<String, u64>,
    samples: Vec<Sample>,
}

impl KindTally {
    fn new() -> Self {
        KindTally {
            sent: 0,
            ok: 0,
            lost: 0,
            latency_sum: Duration::ZERO,
            latency_max: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
            reasons: BTreeMap::new(),
            samples: Vec::new(),
        }
    }
}

/// What every worker adds to; a summary can be taken at any time, also while requests are under
/// way (they are then "unfinished").
pub struct Tally {
    kinds: Vec<KindTally>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            kinds: MIX.iter().map(|_| KindTally::new()).collect(),
        }
    }
}

fn round_to(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

impl Tally {
    pub fn started(&mut self, kind: Kind) {
        self.kinds[kind.index()].sent += 1;
    }

    pub fn ok(&mut self, kind: Kind, elapsed: Duration) {
        let t = &mut self.kinds[kind.index()];
        t.ok += 1;
        t.latency_sum += elapsed;
        t.latency_max = t.latency_max.max(elapsed);
        if let Some(h) = t.latency.as_mut() {
            h.saturating_record(elapsed.as_micros().max(1) as u64);
        }
    }

    pub fn lost(&mut self, kind: Kind, lost: Lost, at: SystemTime, after: Duration) {
        let t = &mut self.kinds[kind.index()];
        t.lost += 1;
        *t.reasons.entry(lost.reason.clone()).or_default() += 1;
        if t.samples.len() < MAX_SAMPLES {
            t.samples.push(Sample {
                at: sys::utc_time_of_day(at),
                reason: lost.reason,
                detail: lost.detail,
                after_s: round_to(after.as_secs_f64(), 3),
            });
        }
    }

    pub fn done_and_lost(&self) -> (u64, u64) {
        let lost: u64 = self.kinds.iter().map(|t| t.lost).sum();
        (self.kinds.iter().map(|t| t.ok).sum::<u64>() + lost, lost)
    }

    pub fn summary(&self, run: RunFacts) -> Summary {
        let sent: u64 = self.kinds.iter().map(|t| t.sent).sum();
        let ok: u64 = self.kinds.iter().map(|t| t.ok).sum();
        let lost: u64 = self.kinds.iter().map(|t| t.lost).sum();
        let secs = run.elapsed.as_secs_f64();
        let per_second = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let kinds = MIX
            .iter()
            .zip(&self.kinds)
            .map(|((kind, _), t)| {
                let ms = |d: Duration| round_to(d.as_secs_f64() * 1000.0, 1);
                let pct = |q: f64| match &t.latency {
                    Some(h) if t.ok > 0 => {
                        Some(round_to(h.value_at_quantile(q) as f64 / 1000.0, 1))
                    }
                    _ => None,
                };
                let row = KindRow {
                    sent: t.sent,
                    ok: t.ok,
                    lost: t.lost,
                    mean_ms: (t.ok > 0).then(|| ms(t.latency_sum / t.ok as u32)),
                    p50_ms: pct(0.5),
                    p99_ms: pct(0.99),
                    max_ms: ms(t.latency_max),
                    reasons: t.reasons.clone(),
                    samples: t.samples.clone(),
                };
                (kind.name(), row)
            })
            .collect();
        Summary {
            label: run.label,
            seconds: round_to(secs, 2),
            workers: run.workers,
            sent,
            ok,
            lost,
            unfinished: sent.saturating_sub(ok + lost),
            rps: round_to(per_second(sent as f64), 1),
            connections: run.connections,
            keepalive_reconnects: run.keepalive_reconnects,
            loadgen_cpu_core: round_to(per_second(run.cpu.as_secs_f64()), 2),
            kinds: KindRows(kinds),
        }
    }
}

pub struct RunFacts {
    pub label: String,
    pub workers: usize,
    pub elapsed: Duration,
    pub cpu: Duration,
    pub connections: u64,
    pub keepalive_reconnects: u64,
}

/// The fields scripts/soak.sh reads: `lost`, `unfinished`, `seconds`, `sent`, `rps`,
/// `loadgen_cpu_core` and `kinds.cancelled.sent`.
#[derive(Serialize)]
pub struct Summary {
    label: String,
    seconds: f64,
    workers: usize,
    sent: u64,
    ok: u64,
    lost: u64,
    unfinished: u64,
    rps: f64,
    connections: u64,
    keepalive_reconnects: u64,
    loadgen_cpu_core: f64,
    kinds: KindRows,
}

#[derive(Serialize)]
struct KindRow {
    sent: u64,
    ok: u64,
    lost: u64,
    mean_ms: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: f64,
    reasons: BTreeMap<String, u64>,
    samples: Vec<Sample>,
}

/// Kinds in the mix's order (a map sorted by name would scatter the report).
struct KindRows(Vec<(&'static str, KindRow)>);

impl Serialize for KindRows {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.unfinished == 0
    }

    pub fn print_table(&self) {
        println!(
            "  {:<11} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8}  reasons",
            "kind", "sent", "ok", "lost", "mean ms", "p99 ms", "max ms"
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for (kind, row) in &self.kinds.0 {
            let reasons: Vec<String> = row
                .reasons
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            println!(
                "  {:<11} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8.1}  {}",
                kind,
                row.sent,
                row.ok,
                row.lost,
                opt(row.mean_ms),
                opt(row.p99_ms),
                row.max_ms,
                reasons.join(", ")
            );
        }
        println!(
            "  {:<11} {:>8} {:>8} {:>6}   {:.0} req/s over {:.1}s, {} connections, load generator CPU {:.2} core",
            "total",
            self.sent,
            self.ok,
            self.lost,
            self.rps,
            self.seconds,
            self.connections,
            self.loadgen_cpu_core
        );
        if self.unfinished > 0 {
            println!(
                "  UNFINISHED: {} requests still running at the hard deadline",
                self.unfinished
            );
        }
        if self.keepalive_reconnects > 0 {
            println!(
                "  note: {} kept-alive connections were found closed by the proxy before reuse \
                 (reconnected, not counted as lost)",
                self.keepalive_reconnects
            );
        }
        for (kind, row) in &self.kinds.0 {
            for s in row.samples.iter().take(PRINTED_SAMPLES) {
                println!(
                    "  lost {kind} at {} after {}s: {} {}",
                    s.at, s.after_s, s.reason, s.detail
                );
            }
            if row.lost > PRINTED_SAMPLES as u64 {
                println!(
                    "  ... {} more {kind} lost (first {MAX_SAMPLES} in the JSON)",
                    row.lost - PRINTED_SAMPLES as u64
                );
            }
        }
    }
}

// ----- requests ------------------------------------------------------------------------------

type Sender = http1::SendRequest<Full<Bytes>>;

/// A worker's kept-alive connection.
struct KeptConn {
    sender: Sender,
    last_used: Instant,
}

struct Generator {
    addr: SocketAddr,
    host_port: String,
    token: String,
    max_body: u64,
    plain_body: Bytes,
    stream_body: Bytes,
    raw_cancel: Vec<u8>,
    connections: AtomicU64,
    keepalive_reconnects: AtomicU64,
}

fn lock(tally: &Mutex<Tally>) -> MutexGuard<'_, Tally> {
    // A panic elsewhere cannot leave counters half-updated in a way that matters here.
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn hyper_lost(context: &str, err: &hyper::Error) -> Lost {
    let reason = if err.is_incomplete_message() {
        "incomplete message"
    } else if err.is_parse() {
        "bad response"
    } else if err.is_canceled() {
        "canceled"
    } else if err.is_closed() {
        "connection closed"
    } else {
        "connection error"
    };
    let source = std::error::Error::source(err)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    Lost::new(reason, format!("{context}: {err}{source}"))
}

fn expect_json(status: StatusCode, body: &[u8], want: u16, key: &str) -> Result<Value, Lost> {
    if status.as_u16() != want {
        return Err(Lost::new(
            format!("status {}", status.as_u16()),
            excerpt(body, 160),
        ));
    }
    let describe = || format!("(status {}) {}", status.as_u16(), excerpt(body, 160));
    let parsed: Value =
        serde_json::from_slice(body).map_err(|_| Lost::new("body not JSON", describe()))?;
    if parsed.get(key).is_none() {
        return Err(Lost::new(format!("no '{key}' in body"), describe()));
    }
    Ok(parsed)
}

fn expect_error_code(status: StatusCode, body: &[u8], want: u16, code: &str) -> Result<(), Lost> {
    let parsed = expect_json(status, body, want, "error")?;
    if parsed.get("error").and_then(Value::as_str) != Some(code) {
        return Err(Lost::new(
            "wrong error code",
            format!("(status {}) {}", status.as_u16(), excerpt(body, 160)),
        ));
    }
    Ok(())
}

const JSON: &str = "Content-Type: application/json\r\n";

impl Generator {
    fn new(args: &Args) -> Self {
        let host_port = format!("{ONLY_HOST}:{}", args.port);
        let stream_body = Bytes::from_static(
            br#"{"model":"gpt-mock","stream":true,"messages":[{"role":"user","content":"soak: stream"}]}"#,
        );
        let raw_cancel = raw_request(
            "POST",
            "/v1/chat/completions",
            &host_port,
            Some(&args.token),
            &format!(
                "{JSON}x-mock-chunks: {CANCEL_CHUNKS}\r\nx-mock-interval-ms: {CANCEL_INTERVAL_MS}\r\n"
            ),
            Some(&stream_body),
        );
        Generator {
            addr: SocketAddr::from((ONLY_HOST, args.port)),
            host_port,
            token: args.token.clone(),
            max_body: args.max_body,
            plain_body: Bytes::from_static(
                br#"{"model":"gpt-mock","messages":[{"role":"user","content":"soak: say hello"}]}"#,
            ),
            stream_body,
            raw_cancel,
            connections: AtomicU64::new(0),
            keepalive_reconnects: AtomicU64::new(0),
        }
    }

    /// The only place a socket is opened, and always to 127.0.0.1.
    async fn connect(&self) -> Result<TcpStream, Lost> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| io_lost(&e))?;
        stream.set_nodelay(true).map_err(|e| io_lost(&e))?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    async fn open_kept(&self) -> Result<KeptConn, Lost> {
        let stream = self.connect().await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| hyper_lost("handshake", &e))?;
        // Ends by itself once the sender is dropped or the proxy closes the connection.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(KeptConn {
            sender,
            last_used: Instant::now(),
        })
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, Lost> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host_port);
        if let Some(token) = auth {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        builder
            .body(Full::new(body))
            .map_err(|e| Lost::new("client request", e.to_string()))
    }

    fn plain_request(&self, delay_ms: Option<u64>) -> Result<Request<Full<Bytes>>, Lost> {
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(ms) = delay_ms {
            headers.push(("x-mock-delay-ms", ms.to_string()));
        }
        let body = self.plain_body.clone();
        self.request(
            "POST",
            "/v1/chat/completions",
            Some(&self.token),
            &headers,
            body,
        )
    }

    /// One request and its whole response on the slot's kept connection (opened if needed). The
    /// slot is refilled only once the exchange has worked: after anything else the connection
    /// is in an unknown state and is dropped.
    async fn exchange(
        &self,
        slot: &mut Option<KeptConn>,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), Lost> {
        let mut conn = None;
        if let Some(mut kept) = slot.take() {
            if kept.sender.is_closed() {
                self.keepalive_reconnects.fetch_add(1, Ordering::Relaxed);
            } else if kept.last_used.elapsed() < KEEPALIVE_IDLE {
                // A connection the proxy closed a moment ago may only show it here; the request
                // has not been sent yet, so a fresh connection is as good.
                if kept.sender.ready().await.is_ok() {
                    conn = Some(kept);
                } else {
                    self.keepalive_reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut conn = match conn {
            Some(conn) => conn,
            None => self.open_kept().await?,
        };
        conn.sender
            .ready()
            .await
            .map_err(|e| hyper_lost("connection", &e))?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| hyper_lost("response", &e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| {
                let mut lost = hyper_lost("body", &e);
                lost.reason = "truncated body".into();
                lost
            })?
            .to_bytes();
        conn.last_used = Instant::now();
        if !conn.sender.is_closed() {
            *slot = Some(conn);
        }
        Ok((status, body))
    }

    async fn run(
        &self,
        kind: Kind,
        slot: &mut Option<KeptConn>,
        rng: &mut Rng,
    ) -> Result<(), Lost> {
        match kind {
            Kind::Plain => self.plain(slot).await,
            Kind::Stream => self.stream(slot).await,
            Kind::Cancelled => self.cancelled(rng).await,
            Kind::OverDecl => self.over_decl(rng).await,
            Kind::OverChunk => self.over_chunk(rng).await,
            Kind::NoToken => self.no_token(slot, rng).await,
            Kind::Malformed => self.malformed(rng).await,
            Kind::Models => self.models(slot).await,
        }
    }

    async fn plain(&self, slot: &mut Option<KeptConn>) -> Result<(), Lost> {
        let (status, body) = self.exchange(slot, self.plain_request(None)?).await?;
        let parsed = expect_json(status, &body, 200, "choices")?;
        match parsed.get("choices").and_then(Value::as_array) {
            Some(choices) if !choices.is_empty() => Ok(()),
            _ => Err(Lost::new("empty choices", excerpt(&body, 160))),
        }
    }

    async fn models(&self, slot: &mut Option<KeptConn>) -> Result<(), Lost> {
        let request = self.request("GET", "/v1/models", Some(&self.token), &[], Bytes::new())?;
        let (status, body) = self.exchange(slot, request).await?;
        expect_json(status, &body, 200, "data").map(drop)
    }

    async fn no_token(&self, slot: &mut Option<KeptConn>, rng: &mut Rng) -> Result<(), Lost> {
        let request = if rng.unit() < 0.5 {
            let headers = [("content-type", "application/json".to_string())];
            let bad = (rng.unit() < 0.5).then_some("not-the-token");
            let body = Bytes::from_static(br#"{"model":"gpt-mock","messages":[]}"#);
            self.request("POST", "/v1/chat/completions", bad, &headers, body)?
        } else {
            self.request("GET", "/v1/models", None, &[], Bytes::new())?
        };
        let (status, body) = self.exchange(slot, request).await?;
        expect_error_code(status, &body, 401, "unauthorized")
    }

    async fn stream(&self, slot: &mut Option<KeptConn>) -> Result<(), Lost> {
        let headers = [
            ("content-type", "application/json".to_string()),
            ("x-mock-chunks", STREAM_CHUNKS.to_string()),
            ("x-mock-interval-ms", STREAM_INTERVAL_MS.to_string()),
        ];
        let body = self.stream_body.clone();
        let request = self.request(
            "POST",
            "/v1/chat/completions",
            Some(&self.token),
            &headers,
            body,
        )?;
        let (status, body) = self.exchange(slot, request).await?;
        check_stream(status, &body)
    }

    async fn cancelled(&self, rng: &mut Rng) -> Result<(), Lost> {
        // Its own connection: the point is to drop it mid-stream.
        let stream = self.connect().await?;
        if rng.unit() < 0.5 {
            // Zero linger: the close below sends an RST instead of a FIN.
            stream.set_zero_linger().map_err(|e| io_lost(&e))?;
        }
        let mut reader = HttpReader::new(stream);
        reader
            .get_mut()
            .write_all(&self.raw_cancel)
            .await
            .map_err(|e| io_lost(&e))?;
        let head = reader.read_head().await?;
        if head.status != 200 {
            return Err(Lost::new(format!("status {}", head.status), ""));
        }
        if !head.is_chunked() {
            return Err(Lost::new(
                "stream not chunked",
                head.header("transfer-encoding"),
            ));
        }
        let want = 1 + rng.below(3);
        let mut counter = SseCounter::default();
        let mut seen = Vec::new();
        while counter.events() < want {
            let chunk = match reader.read_chunk().await {
                Ok(chunk) => chunk,
                Err(lost) if lost.reason == "truncated body" => {
                    return Err(Lost::new("truncated before first event", tail(&seen, 160)));
                }
                Err(lost) => return Err(lost),
            };
            if chunk.is_empty() {
                return Err(Lost::new("stream ended early", tail(&seen, 160)));
            }
            counter.feed(&chunk);
            seen.extend_from_slice(&chunk);
        }
        if !seen.starts_with(b"data: ") {
            return Err(Lost::new("not an SSE event", excerpt(&seen, 160)));
        }
        Ok(())
        // Dropping the reader closes the socket, abruptly.
    }

    /// Sends `head`, then as much of the body as the proxy takes, and reads the answer.
    ///
    /// The proxy answers 413 and closes while the body may still be on its way, so writes can
    /// fail with EPIPE or ECONNRESET; the answer is in the socket's receive queue all the same,
    /// and a client that reads after a failed write gets it.
    async fn oversized_exchange(&self, head: Vec<u8>, parts: Vec<Vec<u8>>) -> Result<(), Lost> {
        let stream = self.connect().await?;
        let mut reader = HttpReader::new(stream);
        let mut write_error = None;
        for part in std::iter::once(&head).chain(&parts) {
            if let Err(err) = reader.get_mut().write_all(part).await {
                write_error = Some(format!("{:?}", err.kind()));
                break;
            }
        }
        let response: Response = reader.read_response().await.map_err(|mut lost| {
            if let Some(err) = &write_error {
                lost.detail = format!("{} (write failed: {err})", lost.detail)
                    .trim()
                    .to_string();
            }
            lost
        })?;
        let status = StatusCode::from_u16(response.head.status)
            .map_err(|_| Lost::new("bad status", response.describe()))?;
        expect_error_code(status, &response.body, 413, "payload_too_large")
    }

    async fn over_decl(&self, rng: &mut Rng) -> Result<(), Lost> {
        let declared = self.max_body + 1 + rng.below(4 * self.max_body);
        let (extra, parts) = match rng.below(3) {
            // Like curl with a large body: headers only until the server says 100 Continue.
            0 => (format!("{JSON}Expect: 100-continue\r\n"), vec![]),
            // Headers only, then waits.
            1 => (JSON.to_string(), vec![]),
            _ => {
                let mut part =
                    br#"{"model":"gpt-mock","messages":[{"role":"user","content":""#.to_vec();
                part.resize(part.len() + 16_000, b'x');
                (JSON.to_string(), vec![part])
            }
        };
        let extra = format!("{extra}Content-Length: {declared}\r\n");
        let head = raw_request(
            "POST",
            "/v1/chat/completions",
            &self.host_port,
            Some(&self.token),
            &extra,
            None,
        );
        self.oversized_exchange(head, parts).await
    }

    async fn over_chunk(&self, rng: &mut Rng) -> Result<(), Lost> {
        let total = self.max_body + 1 + 1 + rng.below(32_767);
        let head = raw_request(
            "POST",
            "/v1/chat/completions",
            &self.host_port,
            Some(&self.token),
            &format!("{JSON}Transfer-Encoding: chunked\r\n"),
            None,
        );
        let mut parts = Vec::new();
        let mut left = total;
        while left > 0 {
            let size = left.min(8192);
            let mut part = format!("{size:x}\r\n").into_bytes();
            part.resize(part.len() + size as usize, b'y');
            part.extend_from_slice(b"\r\n");
            parts.push(part);
            left -= size;
        }
        parts.push(b"0\r\n\r\n".to_vec());
        self.oversized_exchange(head, parts).await
    }

    async fn malformed(&self, rng: &mut Rng) -> Result<(), Lost> {
        let auth = Some(self.token.as_str());
        let request = match rng.below(3) {
            0 => raw_request(
                "POST",
                "/v1/chat/completions",
                &self.host_port,
                auth,
                "Content-Length: 5\r\nContent-Length: 6\r\n",
                None,
            )
            .into_iter()
            .chain(*b"hello!")
            .collect(),
            1 => b"GARBAGE\r\n\r\n".to_vec(),
            _ => raw_request(
                "GET",
                "/v1/models",
                &self.host_port,
                auth,
                "This line has no colon\r\n",
                None,
            ),
        };
        let stream = self.connect().await?;
        let mut reader = HttpReader::new(stream);
        reader
            .get_mut()
            .write_all(&request)
            .await
            .map_err(|e| io_lost(&e))?;
        let response = reader.read_response().await?;
        if response.head.status != 400 {
            return Err(Lost::new(
                format!("status {}", response.head.status),
                excerpt(&response.body, 160),
            ));
        }
        // The proxy must close a connection it cannot parse.
        let rest = reader.read_more(1024).await.map_err(|e| io_lost(&e))?;
        if !rest.is_empty() {
            return Err(Lost::new("data after 400", excerpt(&rest, 160)));
        }
        Ok(())
    }
}

/// A streamed chat completion as the soak expects it, whole.
fn check_stream(status: StatusCode, body: &[u8]) -> Result<(), Lost> {
    if status != StatusCode::OK {
        return Err(Lost::new(
            format!("status {}", status.as_u16()),
            excerpt(body, 160),
        ));
    }
    if !body.ends_with(b"data: [DONE]\n\n") {
        return Err(Lost::new("stream without [DONE]", tail(body, 160)));
    }
    let mut counter = SseCounter::default();
    let events = counter.feed(body);
    if events != STREAM_EVENTS {
        return Err(Lost::new(
            "wrong event count",
            format!("{events} events, expected {STREAM_EVENTS}"),
        ));
    }
    if memchr::memmem::find(body, br#""error""#).is_some() {
        return Err(Lost::new("error event in stream", tail(body, 200)));
    }
    Ok(())
}

// ----- the run -------------------------------------------------------------------------------

struct Run {
    generator: Generator,
    tally: Mutex<Tally>,
    stop: AtomicBool,
    started_total: AtomicU64,
    max_requests: u64,
    seed: u64,
    seconds: f64,
    timeout: Duration,
    t0: Instant,
    wall0: SystemTime,
}

async fn worker(run: Arc<Run>, index: u64) {
    let mut rng = Rng::new(run.seed.wrapping_mul(1000).wrapping_add(index));
    let weights: Vec<u64> = MIX.iter().map(|(_, w)| *w).collect();
    let mut slot: Option<KeptConn> = None;
    // Staggered so that connections do not all open in the same millisecond.
    let stagger = rng.unit() * (run.seconds / 10.0).min(0.5);
    tokio::time::sleep(Duration::from_secs_f64(stagger)).await;
    while !run.stop.load(Ordering::Relaxed) {
        if run.started_total.fetch_add(1, Ordering::Relaxed) >= run.max_requests {
            break;
        }
        let kind = MIX[rng.weighted(&weights)].0;
        lock(&run.tally).started(kind);
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(run.timeout, run.generator.run(kind, &mut slot, &mut rng))
                .await
                .unwrap_or_else(|_| {
                    Err(Lost::new(
                        "timeout",
                        format!("no answer within {}s", run.timeout.as_secs_f64()),
                    ))
                });
        match outcome {
            Ok(()) => lock(&run.tally).ok(kind, started.elapsed()),
            Err(lost) => {
                let at = run.wall0 + (started - run.t0);
                lock(&run.tally).lost(kind, lost, at, started.elapsed());
                slot = None;
            }
        }
    }
}

/// A progress line every `every` seconds; ends the run early if the proxy has exited.
async fn progress(run: Arc<Run>, label: String, pid: u32, every: f64) {
    let mut next_line = if every > 0.0 { every } else { f64::INFINITY };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if pid != 0 && !sys::process_alive(pid) {
            println!("    [{label}] the proxy (pid {pid}) has exited: stopping the load");
            run.stop.store(true, Ordering::Relaxed);
            return;
        }
        let elapsed = run.t0.elapsed().as_secs_f64();
        if elapsed < next_line {
            continue;
        }
        next_line += every;
        let (done, lost) = lock(&run.tally).done_and_lost();
        let mut line = format!(
            "    [{label}] {elapsed:5.0}s  requests {done:>8}  lost {lost}  {:7.0} req/s",
            done as f64 / elapsed
        );
        if pid != 0 {
            line.push_str(&format!("  proxy {}", sys::proc_brief(pid)));
        }
        println!("{line}");
    }
}

async fn mixed(args: &Args) -> (Summary, bool) {
    let run = Arc::new(Run {
        generator: Generator::new(args),
        tally: Mutex::new(Tally::default()),
        stop: AtomicBool::new(false),
        started_total: AtomicU64::new(0),
        max_requests: args.max_requests,
        seed: args.seed,
        seconds: args.seconds,
        timeout: Duration::from_secs_f64(args.timeout),
        t0: Instant::now(),
        wall0: SystemTime::now(),
    });
    let cpu0 = sys::cpu_time();
    let ticker = tokio::spawn(progress(
        run.clone(),
        args.label.clone(),
        args.pid,
        args.progress,
    ));
    let timer = {
        let run = run.clone();
        let seconds = args.seconds;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            run.stop.store(true, Ordering::Relaxed);
        })
    };
    let mut workers = JoinSet::new();
    for index in 0..args.workers as u64 {
        workers.spawn(worker(run.clone(), index));
    }
    // Hard bound: the run, then the longest a request may take, then a margin.
    let hard = run.t0 + Duration::from_secs_f64(args.seconds + args.timeout + 10.0);
    let mut finished = true;
    loop {
        match tokio::time::timeout_at(hard.into(), workers.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(err))) => {
                eprintln!("loadgen: a worker failed: {err}");
                finished = false;
            }
            Err(_) => {
                workers.abort_all();
                finished = false;
                break;
            }
        }
    }
    ticker.abort();
    timer.abort();
    let facts = RunFacts {
        label: args.label.clone(),
        workers: args.workers,
        elapsed: run.t0.elapsed(),
        cpu: sys::cpu_time().saturating_sub(cpu0),
        connections: run.generator.connections.load(Ordering::Relaxed),
        keepalive_reconnects: run.generator.keepalive_reconnects.load(Ordering::Relaxed),
    };
    (lock(&run.tally).summary(facts), finished)
}

/// WORKERS plain requests at once, each held `--fill-delay-ms` at the upstream so that they
/// overlap. The proxy's upstream pool then holds exactly one idle connection per worker (no
/// phase has more upstream requests in flight), so the fd readings that follow do not depend on
/// how many pooled connections the last seconds happened to leave; a pool that leaks still
/// shows, above WORKERS.
async fn fill_pool(args: &Args) -> usize {
    let generator = Arc::new(Generator::new(args));
    let mut set = JoinSet::new();
    for _ in 0..args.workers {
        let generator = generator.clone();
        let delay = args.fill_delay_ms;
        set.spawn(async move {
            let mut slot = None;
            let (status, body) = generator
                .exchange(&mut slot, generator.plain_request(Some(delay))?)
                .await?;
            expect_json(status, &body, 200, "choices").map(drop)
        });
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut failed = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline.into(), set.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(lost)))) => failed.push(lost.to_string()),
            Ok(Some(Err(err))) => failed.push(err.to_string()),
            Err(_) => {
                println!("  pool fill: no answers within {}s", args.timeout);
                return args.workers;
            }
        }
    }
    for failure in failed.iter().take(MAX_SAMPLES) {
        println!("  pool fill request lost: {failure}");
    }
    failed.len()
}

/// One plain chat request, retried until it works or `--timeout` passes.
async fn wait_ready(args: &Args) -> bool {
    let generator = Generator::new(args);
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut last = "never tried".to_string();
    while Instant::now() < deadline {
        let mut slot = None;
        match tokio::time::timeout(Duration::from_secs(2), generator.plain(&mut slot)).await {
            Ok(Ok(())) => return true,
            Ok(Err(lost)) => last = lost.to_string(),
            Err(_) => last = "timeout".to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("proxy not ready: {last}");
    false
}

/// False for NaN too, which a plain `<= 0.0` would let through.
fn positive(x: f64) -> bool {
    x > 0.0
}

fn usage(message: &str) -> ExitCode {
    eprintln!("loadgen soak: error: {message}");
    ExitCode::from(2)
}

pub fn main(args: Args, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if args.host != ONLY_HOST.to_string() {
        return usage(&format!(
            "refusing to target '{}': the soak only ever talks to {ONLY_HOST}",
            args.host
        ));
    }
    if !(1..=1024).contains(&args.workers) || !positive(args.seconds) || !positive(args.timeout) {
        return usage("--workers must be 1..1024, --seconds and --timeout positive");
    }
    // One connection per worker plus one fresh one at most: far below any fd limit, but a low
    // soft limit should not be what a soak finds.
    sys::raise_nofile(None);

    if args.ready {
        return if runtime.block_on(wait_ready(&args)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.fill {
        let lost = runtime.block_on(fill_pool(&args));
        return if lost == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let (summary, finished) = runtime.block_on(mixed(&args));
    summary.print_table();
    if let Some(path) = &args.json {
        let written = serde_json::to_vec_pretty(&summary)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(path, json));
        if let Err(err) = written {
            eprintln!("loadgen soak: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if finished && summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(elapsed_s: u64) -> RunFacts {
        RunFacts {
            label: "t".into(),
            workers: 2,
            elapsed: Duration::from_secs(elapsed_s),
            cpu: Duration::from_millis(500),
            connections: 3,
            keepalive_reconnects: 0,
        }
    }

    #[test]
    fn requests_under_way_are_unfinished_not_lost() {
        let mut tally = Tally::default();
        for _ in 0..3 {
            tally.started(Kind::Plain);
        }
        tally.started(Kind::Cancelled);
        tally.ok(Kind::Plain, Duration::from_millis(10));
        tally.ok(Kind::Plain, Duration::from_millis(30));
        tally.lost(
            Kind::Cancelled,
            Lost::new("timeout", "x"),
            SystemTime::now(),
            Duration::ZERO,
        );
        let s = tally.summary(facts(2));
        assert_eq!((s.sent, s.ok, s.lost, s.unfinished), (4, 2, 1, 1));
        assert!(!s.passed());
        assert_eq!(s.rps, 2.0);
        assert_eq!(s.loadgen_cpu_core, 0.25);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["kinds"]["plain"]["mean_ms"], 20.0);
        assert_eq!(json["kinds"]["plain"]["max_ms"], 30.0);
        assert_eq!(json["kinds"]["cancelled"]["sent"], 1);
        assert_eq!(json["kinds"]["cancelled"]["reasons"]["timeout"], 1);
        assert_eq!(json["kinds"]["models"]["mean_ms"], Value::Null);
        // The report lists kinds in the mix's order.
        let names: Vec<&String> = json["kinds"].as_object().unwrap().keys().collect();
        assert_eq!(names.len(), MIX.len());
    }

    #[test]
    fn samples_are_capped_but_losses_are_not() {
        let mut tally = Tally::default();
        for _ in 0..20 {
            tally.started(Kind::Malformed);
            tally.lost(
                Kind::Malformed,
                Lost::new("status 200", ""),
                SystemTime::now(),
                Duration::ZERO,
            );
        }
        let s = tally.summary(facts(1));
        assert_eq!(s.lost, 20);
        assert_eq!(s.unfinished, 0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["kinds"]["malformed"]["samples"]
                .as_array()
                .unwrap()
                .len(),
            MAX_SAMPLES
        );
    }

    #[test]
    fn stream_check() {
        let mut body = b"data: {\"role\":\"assistant\"}\n\n".to_vec();
        for _ in 0..STREAM_CHUNKS + 1 {
            body.extend_from_slice(b"data: {\"c\":\"x\"}\n\n");
        }
        body.extend_from_slice(b"data: [DONE]\n\n");
        assert_eq!(check_stream(StatusCode::OK, &body), Ok(()));
        let short = &body[body.len() - 40..];
        assert_eq!(
            check_stream(StatusCode::OK, short).unwrap_err().reason,
            "wrong event count"
        );
        assert_eq!(
            check_stream(StatusCode::OK, &body[..body.len() - 1])
                .unwrap_err()
                .reason,
            "stream without [DONE]"
        );
        assert_eq!(
            check_stream(StatusCode::BAD_GATEWAY, &body)
                .unwrap_err()
                .reason,
            "status 502"
        );
    }

    #[test]
    fn error_code_must_match() {
        let body = br#"{"error":"unauthorized","message":"m"}"#;
        assert!(expect_error_code(StatusCode::UNAUTHORIZED, body, 401, "unauthorized").is_ok());
        let wrong = expect_error_code(StatusCode::UNAUTHORIZED, body, 401, "payload_too_large");
        assert_eq!(wrong.unwrap_err().reason, "wrong error code");
        let not_json = expect_json(StatusCode::OK, b"<html>", 200, "data");
        assert_eq!(not_json.unwrap_err().reason, "body not JSON");
    }
}
