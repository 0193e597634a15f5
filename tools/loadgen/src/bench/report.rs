//! The rounds pooled into one row per target and concurrency, how the cost grows, the targets
//! of issue 13 (PASS/FAIL/INFO) and the table printed to stdout.

use std::collections::BTreeMap;

use serde::Serialize;

use super::measure::{PlainRound, StreamRound, WindowOut};
use super::procs::{Startup, StartupRun};
use super::settings::{Base, Settings, is_base, is_h2, twin_of};
use super::stats::{Paired, median, median_some, paired, paired_ratio, round_to, round3};

#[derive(Serialize, Debug, Clone)]
pub struct PooledWindow {
    pub wall_s: f64,
    pub background_cpu_util: Option<f64>,
    pub softirq_cpu_util: Option<f64>,
    pub steal_cpu_util: Option<f64>,
    pub background_cpu_util_max_round: f64,
}

fn pool_windows<'a>(windows: impl Iterator<Item = &'a WindowOut> + Clone) -> PooledWindow {
    let wall: f64 = windows.clone().map(|w| w.wall_s).sum();
    let weighted = |f: fn(&WindowOut) -> Option<f64>| {
        (wall > 0.0).then(|| {
            round3(
                windows
                    .clone()
                    .map(|w| f(w).unwrap_or(0.0) * w.wall_s)
                    .sum::<f64>()
                    / wall,
            )
        })
    };
    PooledWindow {
        wall_s: round3(wall),
        background_cpu_util: weighted(|w| w.background_cpu_util),
        softirq_cpu_util: weighted(|w| w.softirq_cpu_util),
        steal_cpu_util: weighted(|w| w.steal_cpu_util),
        background_cpu_util_max_round: windows
            .map(|w| w.background_cpu_util.unwrap_or(0.0))
            .fold(0.0, f64::max),
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Added {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct PlainRow {
    pub target: String,
    pub concurrency: u32,
    pub rounds: usize,
    pub requests: u64,
    pub rps: f64,
    pub latency_us: Latency,
    pub errors: u64,
    pub non_2xx: u64,
    pub cpu_us_per_request: Option<f64>,
    pub upstream_cpu_us_per_request: Option<f64>,
    pub redis_scripts_per_request: Option<f64>,
    pub redis_commands_per_request: Option<f64>,
    pub window: PooledWindow,
    pub per_round: Vec<PlainRound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_latency_us: Option<Added>,
}

impl PlainRow {
    fn round_cpu(&self) -> Vec<Option<f64>> {
        self.per_round
            .iter()
            .map(|r| r.cpu_us_per_request)
            .collect()
    }
}

pub fn pool_plain(target: &str, concurrency: u32, rounds: Vec<PlainRound>) -> PlainRow {
    let reqs: u64 = rounds.iter().map(|r| r.requests).sum();
    let duration: f64 = rounds.iter().map(|r| r.duration_s).sum();
    let target_cpu: f64 = rounds.iter().map(|r| r.target_cpu_s).sum();
    let up_cpu: f64 = rounds.iter().map(|r| r.upstream_cpu_s).sum();
    let lat = |f: fn(&PlainRound) -> u64| median(rounds.iter().map(|r| f(r) as f64)).unwrap_or(0.0);
    let per_request = |sum: f64| (reqs > 0).then(|| round_to(sum / reqs as f64, 3));
    let redis_counted = rounds.first().is_some_and(|r| r.redis_scripts.is_some());
    PlainRow {
        target: target.to_string(),
        concurrency,
        rounds: rounds.len(),
        requests: reqs,
        rps: if duration > 0.0 {
            round_to(reqs as f64 / duration, 1)
        } else {
            0.0
        },
        latency_us: Latency {
            p50: lat(|r| r.latency_us.p50),
            p90: lat(|r| r.latency_us.p90),
            p99: lat(|r| r.latency_us.p99),
            p999: lat(|r| r.latency_us.p999),
            max: rounds.iter().map(|r| r.latency_us.max).max().unwrap_or(0),
        },
        errors: rounds.iter().map(|r| r.errors).sum(),
        non_2xx: rounds.iter().map(|r| r.non_2xx).sum(),
        cpu_us_per_request: (target != "direct" && reqs > 0)
            .then(|| round_to(target_cpu / reqs as f64 * 1e6, 2)),
        upstream_cpu_us_per_request: (reqs > 0).then(|| round_to(up_cpu / reqs as f64 * 1e6, 2)),
        redis_scripts_per_request: redis_counted
            .then(|| per_request(rounds.iter().filter_map(|r| r.redis_scripts).sum::<u64>() as f64))
            .flatten(),
        redis_commands_per_request: redis_counted
            .then(
                || per_request(rounds.iter().filter_map(|r| r.redis_commands).sum::<u64>() as f64),
            )
            .flatten(),
        window: pool_windows(rounds.iter().map(|r| &r.window)),
        per_round: rounds,
        added_latency_us: None,
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct PooledTtfc {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct PooledGaps {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct AddedTtfc {
    pub p50: f64,
    pub p99: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct StreamRow {
    pub target: String,
    pub concurrency: u32,
    pub chunks: u64,
    pub interval_ms: u64,
    pub rounds: usize,
    pub streams: u64,
    pub events: u64,
    pub ttfc_us: PooledTtfc,
    pub gap_ms: PooledGaps,
    pub errors: u64,
    pub non_2xx: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub cpu_us_per_event: Option<f64>,
    pub upstream_cpu_us_per_event: Option<f64>,
    pub rss_of: &'static str,
    pub peak_rss_kb: u64,
    pub loadgen_cpu_util: f64,
    pub window: PooledWindow,
    pub per_round: Vec<StreamRound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_ttfc_us: Option<AddedTtfc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_gap_max_ms: Option<f64>,
}

pub fn pool_stream(
    settings: &Settings,
    target: &str,
    concurrency: u32,
    interval_ms: u64,
    rounds: Vec<StreamRound>,
) -> StreamRow {
    let events: u64 = rounds.iter().map(|r| r.events).sum();
    let target_cpu: f64 = rounds.iter().map(|r| r.target_cpu_s).sum();
    let up_cpu: f64 = rounds.iter().map(|r| r.upstream_cpu_s).sum();
    let mut error_kinds = BTreeMap::new();
    for r in &rounds {
        for (k, v) in &r.error_kinds {
            *error_kinds.entry(k.clone()).or_insert(0) += v;
        }
    }
    let max_of = |f: fn(&StreamRound) -> Option<f64>| {
        rounds
            .iter()
            .map(|r| f(r).unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    StreamRow {
        target: target.to_string(),
        concurrency,
        chunks: settings.stream_chunks,
        interval_ms,
        rounds: rounds.len(),
        streams: rounds.iter().map(|r| r.streams).sum(),
        events,
        ttfc_us: PooledTtfc {
            p50: median_some(rounds.iter().map(|r| r.ttfc_us.p50)),
            p90: median_some(rounds.iter().map(|r| r.ttfc_us.p90)),
            p99: median_some(rounds.iter().map(|r| r.ttfc_us.p99)),
            max: max_of(|r| r.ttfc_us.max),
        },
        gap_ms: PooledGaps {
            p50: median_some(rounds.iter().map(|r| r.gap_ms.p50)),
            p99: median_some(rounds.iter().map(|r| r.gap_ms.p99)),
            p999: median_some(rounds.iter().map(|r| r.gap_ms.p999)),
            max: max_of(|r| r.gap_ms.max),
        },
        errors: rounds.iter().map(|r| r.errors).sum(),
        non_2xx: rounds.iter().map(|r| r.non_2xx).sum(),
        error_kinds,
        cpu_us_per_event: (target != "direct" && events > 0)
            .then(|| round_to(target_cpu / events as f64 * 1e6, 2)),
        upstream_cpu_us_per_event: (events > 0).then(|| round_to(up_cpu / events as f64 * 1e6, 2)),
        rss_of: if target != "direct" {
            "target"
        } else {
            "upstream"
        },
        peak_rss_kb: rounds.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0),
        loadgen_cpu_util: max_of(|r| r.loadgen_cpu_util),
        window: pool_windows(rounds.iter().map(|r| &r.window)),
        per_round: rounds,
        added_ttfc_us: None,
        added_gap_max_ms: None,
    }
}

fn find<'a, T>(
    rows: &'a [T],
    target: &str,
    concurrency: u32,
    key: impl Fn(&T) -> (&str, u32),
) -> Option<&'a T> {
    rows.iter().find(|r| key(r) == (target, concurrency))
}

pub fn find_plain<'a>(rows: &'a [PlainRow], target: &str, conc: u32) -> Option<&'a PlainRow> {
    find(rows, target, conc, |r| (r.target.as_str(), r.concurrency))
}

/// The rows of `base` and `with` at `conc` and their CPU per request, when both measured one.
fn cpu_pair<'a>(
    rows: &'a [PlainRow],
    base: &str,
    with: &str,
    conc: u32,
) -> Option<(&'a PlainRow, f64, &'a PlainRow, f64)> {
    let (b, w) = (find_plain(rows, base, conc)?, find_plain(rows, with, conc)?);
    let (bc, wc) = (b.cpu_us_per_request?, w.cpu_us_per_request?);
    (bc != 0.0 && wc != 0.0).then_some((b, bc, w, wc))
}

pub fn find_stream<'a>(rows: &'a [StreamRow], target: &str, conc: u32) -> Option<&'a StreamRow> {
    find(rows, target, conc, |r| (r.target.as_str(), r.concurrency))
}

/// Latency added to "direct" by each target on the same (plain HTTP) upstream.
pub fn add_deltas(rows: &mut [PlainRow], conc: u32) {
    let Some(direct) = find_plain(rows, "direct", conc).map(|d| d.latency_us.clone()) else {
        return;
    };
    for row in rows.iter_mut() {
        if row.concurrency == conc && row.target != "direct" && !is_h2(&row.target) {
            row.added_latency_us = Some(Added {
                p50: row.latency_us.p50 - direct.p50,
                p90: row.latency_us.p90 - direct.p90,
                p99: row.latency_us.p99 - direct.p99,
            });
        }
    }
}

pub fn add_stream_deltas(rows: &mut [StreamRow], conc: u32) {
    let Some(direct) = find_stream(rows, "direct", conc).map(|d| (d.ttfc_us.clone(), d.gap_ms.max))
    else {
        return;
    };
    for row in rows.iter_mut() {
        if row.concurrency != conc || row.target == "direct" || is_h2(&row.target) {
            continue;
        }
        if let (Some(d50), Some(e50)) = (direct.0.p50, row.ttfc_us.p50) {
            let d99 = direct.0.p99.unwrap_or(0.0);
            let e99 = row.ttfc_us.p99.unwrap_or(0.0);
            row.added_ttfc_us = Some(AddedTtfc {
                p50: round_to(e50 - d50, 1),
                p99: round_to(e99 - d99, 1),
            });
            row.added_gap_max_ms = Some(round3(row.gap_ms.max - direct.1));
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ByStreams {
    pub streams: u32,
    pub interval_ms: u64,
    pub cpu_us_per_event: Option<f64>,
    pub peak_rss_kb: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct StreamGrowth {
    pub by_streams: Vec<ByStreams>,
    /// kb_per_stream_LO_to_HI, idle_rss_kb, kb_per_stream_from_idle_HI.
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ClientsGrowth {
    pub clients: [usize; 2],
    pub cpu_us_per_request: [f64; 2],
    pub ratio_pooled: f64,
    pub ratio: Option<f64>,
    pub p50_us: [f64; 2],
    pub p99_us: [f64; 2],
}

/// Keyed lists that keep their order in the JSON as in the table.
fn ordered_map<S: serde::Serializer, V: Serialize>(
    entries: &[(String, V)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(entries.iter().map(|(k, v)| (k, v)))
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Growth {
    #[serde(serialize_with = "ordered_map")]
    pub streams: Vec<(String, StreamGrowth)>,
    #[serde(serialize_with = "ordered_map")]
    pub clients: Vec<(String, ClientsGrowth)>,
}

fn kb_from_to(lo: u32, hi: u32) -> String {
    format!("kb_per_stream_{lo}_to_{hi}")
}

fn kb_from_idle(hi: u32) -> String {
    format!("kb_per_stream_from_idle_{hi}")
}

/// How the cost grows with the number of open streams (CPU per chunk, peak RSS, KB per open
/// stream) and with the number of clients in the clients file (CPU per request).
pub fn growth(
    settings: &Settings,
    plain: &[PlainRow],
    stream: &[StreamRow],
    startup_proxy: Option<&Startup>,
    startup_nginx: Option<&Startup>,
) -> Growth {
    let mut out = Growth::default();
    let mut concs: Vec<u32> = stream.iter().map(|e| e.concurrency).collect();
    concs.sort_unstable();
    concs.dedup();
    let (lo, hi) = settings.rss_reference();
    for t in ["nginx", "proxy", "proxy-h2", "direct"] {
        let rows: Vec<&StreamRow> = concs
            .iter()
            .filter_map(|&c| find_stream(stream, t, c))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut g = StreamGrowth {
            by_streams: rows
                .iter()
                .map(|e| ByStreams {
                    streams: e.concurrency,
                    interval_ms: e.interval_ms,
                    cpu_us_per_event: e.cpu_us_per_event,
                    peak_rss_kb: e.peak_rss_kb,
                })
                .collect(),
            figures: BTreeMap::new(),
        };
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let (a, b) = (find_stream(stream, t, lo), find_stream(stream, t, hi));
            if let (Some(a), Some(b)) = (a, b)
                && hi > lo
            {
                g.figures.insert(
                    kb_from_to(lo, hi),
                    round_to(
                        (b.peak_rss_kb as f64 - a.peak_rss_kb as f64) / (hi - lo) as f64,
                        1,
                    ),
                );
            }
            let idle = match t {
                "direct" => None,
                "nginx" => startup_nginx,
                _ => startup_proxy,
            };
            if let (Some(b), Some(idle)) = (b, idle) {
                g.figures
                    .insert("idle_rss_kb".into(), idle.idle_rss_kb_median);
                g.figures.insert(
                    kb_from_idle(hi),
                    round_to(
                        (b.peak_rss_kb as f64 - idle.idle_rss_kb_median) / hi as f64,
                        1,
                    ),
                );
            }
        }
        out.streams.push((t.to_string(), g));
    }
    for &conc in &settings.plain_concurrency {
        let (Some(one), Some(many)) = (
            find_plain(plain, "clients1", conc),
            find_plain(plain, "clients10k", conc),
        ) else {
            continue;
        };
        let (Some(c1), Some(cn)) = (one.cpu_us_per_request, many.cpu_us_per_request) else {
            continue;
        };
        if c1 == 0.0 || cn == 0.0 {
            continue;
        }
        out.clients.push((
            conc.to_string(),
            ClientsGrowth {
                clients: [1, settings.clients],
                cpu_us_per_request: [c1, cn],
                ratio_pooled: round3(cn / c1),
                ratio: paired_ratio(&one.round_cpu(), &many.round_cpu()).map(round3),
                p50_us: [one.latency_us.p50, many.latency_us.p50],
                p99_us: [one.latency_us.p99, many.latency_us.p99],
            },
        ));
    }
    out
}

/// Cores used by other processes in a round above which its figures are noise.
pub const NOISY_BG: f64 = 0.15;

#[derive(Serialize, Debug, Clone)]
pub struct Check {
    pub target: String,
    pub pass: Option<bool>,
    pub measured: String,
    pub limit: String,
    pub ratio: Option<f64>,
    pub note: String,
    pub reliable: bool,
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

fn fmt2(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// The run's figures the targets and the table read.
pub struct Figures<'a> {
    pub settings: &'a Settings,
    pub plain: &'a [PlainRow],
    pub stream: &'a [StreamRow],
    pub growth: &'a Growth,
    pub startup_proxy: Option<&'a Startup>,
    pub startup_nginx: Option<&'a Startup>,
}

struct Checks(Vec<Check>);

impl Checks {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        name: String,
        pass: Option<bool>,
        measured: String,
        limit: String,
        ratio: Option<f64>,
        note: String,
        windows: &[&PooledWindow],
    ) {
        let bg = windows
            .iter()
            .map(|w| w.background_cpu_util_max_round)
            .fold(0.0, f64::max);
        let reliable = bg <= NOISY_BG;
        let mut note = note;
        if !reliable {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&format!(
                "NOISY: other processes used up to {bg:.2} cores in a round"
            ));
        }
        self.0.push(Check {
            target: name,
            pass,
            measured,
            limit,
            ratio: ratio.map(round3),
            note,
            reliable,
        });
    }
}

/// What routing by model may cost at most, per request and per chunk, over the one-upstream
/// proxy (issue 19): percent.
const ROUTED_LIMIT_PCT: f64 = 3.0;
const ROUTED_WHAT: &str =
    "routing by model (3 upstreams, 30 model patterns, 10 aliases; a weighted tier)";

/// What pricing and dollar budgets may cost at most per request over the limited client
/// (issue 20): percent.
const PRICED_LIMIT_PCT: f64 = 2.0;

/// How a paired ratio of routed over proxy reads against ROUTED_LIMIT_PCT.
fn within(ratio: f64) -> String {
    if ratio <= 1.0 + ROUTED_LIMIT_PCT / 100.0 {
        format!("within {ROUTED_LIMIT_PCT}%")
    } else {
        format!("more than {ROUTED_LIMIT_PCT}% over")
    }
}

/// The targets (PASS/FAIL) and the figures it asks to be reported (pass None).
pub fn check_targets(f: &Figures) -> Vec<Check> {
    let s = f.settings;
    let mut checks = Checks(Vec::new());

    // CPU against nginx, in the same run.
    for &conc in &s.plain_concurrency {
        let limit = if conc == 1 { 1.3 } else { 2.5 };
        if let (Some(p), Some(n)) = (
            find_plain(f.plain, "proxy", conc),
            find_plain(f.plain, "nginx", conc),
        ) && let (Some(pc), Some(nc)) = (p.cpu_us_per_request, n.cpu_us_per_request)
            && nc != 0.0
        {
            let ratio = pc / nc;
            checks.add(
                format!("CPU per plain request, c={conc}: proxy <= {limit} x nginx"),
                Some(ratio <= limit),
                format!("{pc:.1} us"),
                format!("{limit} x {nc:.1} us"),
                Some(ratio),
                String::new(),
                &[&p.window, &n.window],
            );
        }
    }
    for e in f.stream {
        if e.target != "proxy" && !is_h2(&e.target) {
            continue;
        }
        let Some(n) = find_stream(f.stream, "nginx", e.concurrency) else {
            continue;
        };
        let (Some(ec), Some(nc)) = (e.cpu_us_per_event, n.cpu_us_per_event) else {
            continue;
        };
        if ec == 0.0 || nc == 0.0 {
            continue;
        }
        let ratio = ec / nc;
        let scored = e.target == "proxy" && s.stream_concurrency.contains(&e.concurrency);
        let via = if is_h2(&e.target) {
            " (HTTP/2 over TLS upstream; nginx's is plain HTTP/1.1)"
        } else {
            ""
        };
        checks.add(
            format!(
                "CPU per streamed chunk, {} streams: {}{}",
                e.concurrency,
                e.target,
                if scored {
                    " <= 1.3 x nginx"
                } else {
                    " vs nginx"
                }
            ),
            scored.then_some(ratio <= 1.3),
            format!("{ec:.1} us"),
            format!("{}{nc:.1} us", if scored { "1.3 x " } else { "nginx " }),
            Some(ratio),
            format!("{} ms between chunks{via}", e.interval_ms),
            &[&e.window, &n.window],
        );
    }

    // Memory.
    let (lo, hi) = s.rss_reference();
    for (t, limit, via) in [("proxy-h2", 40u64, "HTTP/2 (TLS)"), ("proxy", 45, "HTTP/1")] {
        let Some(lo) = lo else { continue };
        let Some(e) = find_stream(f.stream, t, lo) else {
            continue;
        };
        let note = match find_stream(f.stream, "nginx", lo) {
            Some(n) => format!(
                "{t}; nginx (master+workers, RSS sum) {:.1} MiB",
                n.peak_rss_kb as f64 / 1024.0
            ),
            None => t.to_string(),
        };
        checks.add(
            format!("Peak RSS, {lo} streams via an {via} upstream <= {limit} MiB"),
            Some(e.peak_rss_kb <= limit * 1024),
            format!("{:.1} MiB", e.peak_rss_kb as f64 / 1024.0),
            format!("{limit} MiB"),
            Some(e.peak_rss_kb as f64 / (limit * 1024) as f64),
            note,
            &[],
        );
    }
    if let (Some(lo), Some(hi)) = (lo, hi) {
        for (t, g) in &f.growth.streams {
            if t == "direct" {
                continue;
            }
            let (Some(b), Some(per)) = (
                find_stream(f.stream, t, hi),
                g.figures.get(&kb_from_to(lo, hi)),
            ) else {
                continue;
            };
            checks.add(
                format!("Peak RSS, {hi} open streams: {t}"),
                None,
                format!("{:.1} MiB", b.peak_rss_kb as f64 / 1024.0),
                "-".into(),
                None,
                format!(
                    "{per:.1} KB per stream from {lo} to {hi}; {} KB per stream from idle",
                    fmt(g.figures.get(&kb_from_idle(hi)).copied())
                ),
                &[],
            );
        }
    }

    // Features, each against the plain proxy (or the row it adds to) in the same run.
    for &conc in &s.plain_concurrency {
        let clients_what = format!("{} clients in the file instead of 1", s.clients);
        for (base_t, with_t, what) in [
            (
                "proxy",
                "limited",
                "client limits (per-minute, concurrency, budget, models)",
            ),
            (
                "quiet",
                "proxy",
                "the access line (LOG_LEVEL=info vs error)",
            ),
            ("clients1", "clients10k", clients_what.as_str()),
        ] {
            let Some((b, bc, w, wc)) = cpu_pair(f.plain, base_t, with_t, conc) else {
                continue;
            };
            let Some(ratio) = paired_ratio(&b.round_cpu(), &w.round_cpu()) else {
                continue;
            };
            checks.add(
                format!("CPU per request, c={conc}: {with_t} vs {base_t} <= +5%"),
                Some(ratio <= 1.05),
                format!("{:+.1}%", (ratio - 1.0) * 100.0),
                "+5%".into(),
                Some(ratio),
                format!(
                    "{what}; median of {} rounds' ratios; pooled {wc:.1} vs {bc:.1} us",
                    w.per_round.len()
                ),
                &[&b.window, &w.window],
            );
        }
        if let Some((b, bc, w, wc)) = cpu_pair(f.plain, "proxy", "routed", conc)
            && let Some(ratio) = paired_ratio(&b.round_cpu(), &w.round_cpu())
        {
            checks.add(
                format!("CPU per request, c={conc}: routed vs proxy <= +{ROUTED_LIMIT_PCT}%"),
                Some(ratio <= 1.0 + ROUTED_LIMIT_PCT / 100.0),
                format!("{:+.1}%", (ratio - 1.0) * 100.0),
                format!("+{ROUTED_LIMIT_PCT}%"),
                Some(ratio),
                format!(
                    "{ROUTED_WHAT}; {}; median of {} rounds' ratios; pooled {wc:.1} vs {bc:.1} us",
                    within(ratio),
                    w.per_round.len()
                ),
                &[&b.window, &w.window],
            );
        }
        if let Some((b, bc, w, wc)) = cpu_pair(f.plain, "limited", "priced", conc)
            && let Some(ratio) = paired_ratio(&b.round_cpu(), &w.round_cpu())
        {
            checks.add(
                format!("CPU per request, c={conc}: priced vs limited <= +{PRICED_LIMIT_PCT}%"),
                Some(ratio <= 1.0 + PRICED_LIMIT_PCT / 100.0),
                format!("{:+.1}%", (ratio - 1.0) * 100.0),
                format!("+{PRICED_LIMIT_PCT}%"),
                Some(ratio),
                format!(
                    "dollar budgets and prices (a reservation before the call, the cost of the usage after it); median of {} rounds' ratios; pooled {wc:.1} vs {bc:.1} us",
                    w.per_round.len()
                ),
                &[&b.window, &w.window],
            );
        }
        if let Some((l, lc, sh, sc)) = cpu_pair(f.plain, "limited", "shared", conc) {
            checks.add(
                format!("Limits in Redis, c={conc}: shared vs limited"),
                None,
                format!("{:+.1} us CPU/req", sc - lc),
                "-".into(),
                Some(sc / lc),
                format!(
                    "{:+} us p50, {:+} us p99; CPU of the proxy and redis-server together",
                    (sh.latency_us.p50 - l.latency_us.p50) as i64,
                    (sh.latency_us.p99 - l.latency_us.p99) as i64
                ),
                &[&l.window, &sh.window],
            );
        }
    }
    // Routing is decided once per request: a forwarded chunk costs what it costs without it.
    for e in f.stream {
        if e.target != "routed" {
            continue;
        }
        let Some(b) = find_stream(f.stream, "proxy", e.concurrency) else {
            continue;
        };
        let round_cpu = |row: &StreamRow| -> Vec<Option<f64>> {
            row.per_round.iter().map(|r| r.cpu_us_per_event).collect()
        };
        let (Some(ratio), Some(ec), Some(bc)) = (
            paired_ratio(&round_cpu(b), &round_cpu(e)),
            e.cpu_us_per_event,
            b.cpu_us_per_event,
        ) else {
            continue;
        };
        checks.add(
            format!(
                "CPU per streamed chunk, {} streams: routed vs proxy unchanged (<= +{ROUTED_LIMIT_PCT}%)",
                e.concurrency
            ),
            Some(ratio <= 1.0 + ROUTED_LIMIT_PCT / 100.0),
            format!("{:+.1}%", (ratio - 1.0) * 100.0),
            format!("+{ROUTED_LIMIT_PCT}%"),
            Some(ratio),
            format!(
                "{ROUTED_WHAT}; {}; {} ms between chunks; median of {} rounds' ratios; pooled {ec:.2} vs {bc:.2} us \
                 (the request's own cost spread over its chunks included)",
                within(ratio),
                e.interval_ms,
                e.per_round.len()
            ),
            &[&b.window, &e.window],
        );
    }
    for e in f.plain {
        if e.target != "shared" {
            continue;
        }
        let Some(scripts) = e.redis_scripts_per_request else {
            continue;
        };
        checks.add(
            format!("Redis round trips per request, c={}: shared", e.concurrency),
            None,
            format!("{scripts:.2}"),
            "-".into(),
            None,
            format!(
                "EVAL/EVALSHA calls the redis-server ran / requests (llm-proxy sends nothing else per request: the \
                 decision before the call, the settlement after it); {:.1} commands with those inside the scripts",
                e.redis_commands_per_request.unwrap_or(0.0)
            ),
            &[],
        );
    }

    // Latency at c=1, as the issue asks: reported.
    if let (Some(p), Some(n), Some(d)) = (
        find_plain(f.plain, "proxy", 1),
        find_plain(f.plain, "nginx", 1),
        find_plain(f.plain, "direct", 1),
    ) && let (Some(pa), Some(na)) = (&p.added_latency_us, &n.added_latency_us)
    {
        checks.add(
            "Added latency c=1: proxy p99 (p50)".into(),
            None,
            format!("{} us ({} us)", pa.p99 as i64, pa.p50 as i64),
            "-".into(),
            None,
            format!(
                "nginx adds {} us ({} us); direct p99 {} us",
                na.p99 as i64, na.p50 as i64, d.latency_us.p99 as i64
            ),
            &[&p.window, &n.window, &d.window],
        );
    }

    // Footprint.
    if let Some(su) = f.startup_proxy {
        let idle = su.idle_rss_kb_median;
        checks.add(
            "Idle RSS <= 10 MiB".into(),
            Some(idle <= 10.0 * 1024.0),
            format!("{:.1} MiB", idle / 1024.0),
            "10 MiB".into(),
            Some(idle / (10.0 * 1024.0)),
            f.startup_nginx.map_or_else(String::new, |sn| {
                format!(
                    "nginx {:.1} MiB RSS / {:.1} MiB PSS",
                    sn.idle_rss_kb_median / 1024.0,
                    sn.idle_pss_kb_median / 1024.0
                )
            }),
            &[],
        );
        checks.add(
            "Start-up (spawn -> first response) < 50 ms".into(),
            Some(su.first_response_ms_median < 50.0),
            format!("{:.1} ms", su.first_response_ms_median),
            "50 ms".into(),
            Some(su.first_response_ms_median / 50.0),
            format!(
                "median of {}; first accepted connect {:.1} ms; nginx {:.1} ms",
                su.tries,
                su.connect_ms_median,
                f.startup_nginx
                    .map_or(f64::NAN, |sn| sn.first_response_ms_median)
            ),
            &[],
        );
    }

    // Errors, in every run of every target (direct and nginx too: a failing floor voids the run).
    let runs: Vec<(&str, u32, u64, u64)> = f
        .plain
        .iter()
        .map(|e| (e.target.as_str(), e.concurrency, e.errors, e.non_2xx))
        .chain(
            f.stream
                .iter()
                .map(|e| (e.target.as_str(), e.concurrency, e.errors, e.non_2xx)),
        )
        .collect();
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| r.2 > 0 || r.3 > 0)
        .map(|(t, c, e, n)| format!("('{t}', {c}, {e}, {n})"))
        .collect();
    checks.add(
        "Zero errors and zero non-2xx in every run".into(),
        Some(bad.is_empty()),
        format!(
            "{} errors, {} non-2xx",
            runs.iter().map(|r| r.2).sum::<u64>(),
            runs.iter().map(|r| r.3).sum::<u64>()
        ),
        "0".into(),
        None,
        if bad.is_empty() {
            format!("{} runs", runs.len())
        } else {
            format!(
                "runs (target, concurrency, errors, non-2xx): [{}]",
                bad.join(", ")
            )
        },
        &[],
    );
    checks.0
}

/// One figure of a target against its twin from the base binary (BENCH_BASE_BIN).
#[derive(Serialize, Debug, Clone)]
pub struct BaseRatio {
    pub target: String,
    /// "plain", "stream" or "footprint".
    pub phase: &'static str,
    /// Requests in flight (plain) or open streams; None for the footprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// "cpu_us_per_request", "cpu_us_per_event", "peak_rss_kb", "idle_rss_kb" or
    /// "first_response_ms".
    pub figure: &'static str,
    /// The pooled figure of each binary's row (the median of the tries for the footprint).
    pub current: Option<f64>,
    pub base: Option<f64>,
    /// Current over base: the median of the rounds' ratios, their range and each one.
    #[serde(flatten)]
    pub paired: Paired,
    /// Other processes used more than NOISY_BG cores in a round of either row.
    pub noisy: bool,
}

/// The "Against the base binary" figures: each twinned row over its twin, paired by round.
#[derive(Serialize, Debug, Clone)]
pub struct AgainstBase {
    pub bin: String,
    pub targets: Vec<String>,
    pub rows: Vec<BaseRatio>,
}

/// One figure of a start-up try.
type TryFigure = fn(&StartupRun) -> f64;

fn noisy(windows: &[&PooledWindow]) -> bool {
    windows
        .iter()
        .any(|w| w.background_cpu_util_max_round > NOISY_BG)
}

/// Every row with a twin from the base binary against that twin, round by round: CPU per
/// request (plain), CPU per chunk and peak RSS (streams), and idle RSS and start-up time of the
/// fresh instances (the i-th try of one against the i-th of the other).
pub fn against_base(
    base: &Base,
    plain: &[PlainRow],
    stream: &[StreamRow],
    startup_proxy: Option<&Startup>,
    startup_base: Option<&Startup>,
) -> AgainstBase {
    let mut rows = Vec::new();
    for cur in plain.iter().filter(|r| !is_base(&r.target)) {
        let Some(old) = twin_of(&cur.target).and_then(|t| find_plain(plain, t, cur.concurrency))
        else {
            continue;
        };
        if let Some(p) = paired(&old.round_cpu(), &cur.round_cpu()) {
            rows.push(BaseRatio {
                target: cur.target.clone(),
                phase: "plain",
                concurrency: Some(cur.concurrency),
                interval_ms: None,
                figure: "cpu_us_per_request",
                current: cur.cpu_us_per_request,
                base: old.cpu_us_per_request,
                paired: p,
                noisy: noisy(&[&cur.window, &old.window]),
            });
        }
    }
    for cur in stream.iter().filter(|r| !is_base(&r.target)) {
        let Some(old) = twin_of(&cur.target).and_then(|t| find_stream(stream, t, cur.concurrency))
        else {
            continue;
        };
        let cpu = |r: &StreamRow| -> Vec<Option<f64>> {
            r.per_round.iter().map(|x| x.cpu_us_per_event).collect()
        };
        let rss = |r: &StreamRow| -> Vec<Option<f64>> {
            r.per_round
                .iter()
                .map(|x| Some(x.peak_rss_kb as f64))
                .collect()
        };
        let figures = [
            (
                "cpu_us_per_event",
                paired(&cpu(old), &cpu(cur)),
                cur.cpu_us_per_event,
                old.cpu_us_per_event,
            ),
            (
                "peak_rss_kb",
                paired(&rss(old), &rss(cur)),
                Some(cur.peak_rss_kb as f64),
                Some(old.peak_rss_kb as f64),
            ),
        ];
        for (figure, p, current, base) in figures {
            let Some(p) = p else { continue };
            rows.push(BaseRatio {
                target: cur.target.clone(),
                phase: "stream",
                concurrency: Some(cur.concurrency),
                interval_ms: Some(cur.interval_ms),
                figure,
                current,
                base,
                paired: p,
                noisy: noisy(&[&cur.window, &old.window]),
            });
        }
    }
    if let (Some(cur), Some(old)) = (startup_proxy, startup_base) {
        let tries = |s: &Startup, f: TryFigure| -> Vec<Option<f64>> {
            s.runs.iter().map(|r| Some(f(r))).collect()
        };
        let figures: [(&'static str, TryFigure, f64, f64); 2] = [
            (
                "idle_rss_kb",
                |r| r.idle_rss_kb as f64,
                cur.idle_rss_kb_median,
                old.idle_rss_kb_median,
            ),
            (
                "first_response_ms",
                |r| r.first_response_ms,
                cur.first_response_ms_median,
                old.first_response_ms_median,
            ),
        ];
        for (figure, f, current, base) in figures {
            let Some(p) = paired(&tries(old, f), &tries(cur, f)) else {
                continue;
            };
            rows.push(BaseRatio {
                target: "proxy".into(),
                phase: "footprint",
                concurrency: None,
                interval_ms: None,
                figure,
                current: Some(current),
                base: Some(base),
                paired: p,
                noisy: false,
            });
        }
    }
    AgainstBase {
        bin: base.bin.display().to_string(),
        targets: base.targets.clone(),
        rows,
    }
}

/// The table's lines for one figure against the base binary.
fn base_line(r: &BaseRatio) -> String {
    let (what, unit, scale) = match r.figure {
        "cpu_us_per_request" => ("CPU per request", "us", 1.0),
        "cpu_us_per_event" => ("CPU per chunk", "us", 1.0),
        "peak_rss_kb" => ("Peak RSS", "MiB", 1024.0),
        "idle_rss_kb" => ("Idle RSS (fresh instance)", "MiB", 1024.0),
        _ => ("Start-up, spawn -> 1st response", "ms", 1.0),
    };
    let at = match (r.phase, r.concurrency) {
        ("plain", Some(c)) => format!(", c={c}"),
        (_, Some(c)) => format!(", {c} streams"),
        _ => String::new(),
    };
    let v = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{:.1}", x / scale));
    format!(
        "{:<5} {:<44} {:+6.1}%  ratio {:.3}  rounds {:.3}..{:.3} ({})  {} vs base {} {unit}{}",
        if r.noisy { "INFO?" } else { "INFO" },
        format!("{what}{at}: {}", r.target),
        (r.paired.ratio - 1.0) * 100.0,
        r.paired.ratio,
        r.paired.min,
        r.paired.max,
        r.paired.rounds.len(),
        v(r.current),
        v(r.base),
        if r.noisy { "  (NOISY)" } else { "" }
    )
}

/// The parts of the results the table shows that are not rows.
pub struct Header<'a> {
    pub started_utc: &'a str,
    pub pinning: &'a str,
    pub workers: u32,
    pub priority: &'a str,
    pub proxy_log: &'a str,
    pub nginx_access_log: &'a str,
}

pub struct FootprintView<'a> {
    pub proxy_binary_bytes: u64,
    pub proxy_binary_stripped: Option<bool>,
    pub nginx_binary_bytes: u64,
    pub nginx_worker_processes: Option<usize>,
    /// proxy RSS, proxy PSS, nginx RSS, nginx PSS after all load.
    pub after_load: Option<(u64, Option<u64>, u64, u64)>,
    pub startup_proxy: &'a Startup,
    pub startup_nginx: &'a Startup,
}

/// The table printed to stdout.
pub fn table(
    h: &Header,
    f: &Figures,
    fp: Option<&FootprintView>,
    checks: &[Check],
    against: Option<&AgainstBase>,
) -> String {
    use std::fmt::Write;
    let s = f.settings;
    let mut o = String::new();
    // Writing to a String cannot fail.
    macro_rules! line {
        ($($arg:tt)*) => { let _ = writeln!(o, $($arg)*); };
    }
    line!(
        "llm-proxy benchmark  {}  pinning={} workers={} priority={}",
        h.started_utc,
        h.pinning,
        h.workers,
        h.priority
    );
    line!(
        "proxy log: {}; nginx access_log: {}",
        h.proxy_log,
        h.nginx_access_log
    );
    line!();
    // The target column: 10 wide, wider for a twin from the base binary ("base:clients10k").
    let tw = f
        .plain
        .iter()
        .map(|e| e.target.len())
        .chain(f.stream.iter().map(|e| e.target.len()))
        .fold(10, usize::max);
    if !f.plain.is_empty() {
        line!(
            "Plain chat completions (wrk -t1; {} rounds of {}s per target, targets interleaved, after {}s warm-up; req/s and CPU pooled, percentiles = median of rounds)",
            s.rounds,
            s.plain_seconds,
            s.warmup_seconds
        );
        let hdr = format!(
            "{:<tw$} {:>5} {:>9} {:>8} {:>8} {:>9} {:>9} {:>11} {:>11} {:>6} {:>7} {:>5}",
            "target",
            "conc",
            "req/s",
            "p50 us",
            "p99 us",
            "+p50 us",
            "+p99 us",
            "cpu us/req",
            "mock us/req",
            "errors",
            "non2xx",
            "bg"
        );
        line!("{hdr}");
        line!("{}", "-".repeat(hdr.len()));
        for e in f.plain {
            let add = |g: fn(&Added) -> f64| {
                e.added_latency_us
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |a| (g(a) as i64).to_string())
            };
            line!(
                "{:<tw$} {:>5} {:>9.0} {:>8} {:>8} {:>9} {:>9} {:>11} {:>11} {:>6} {:>7} {:>5.2}",
                e.target,
                e.concurrency,
                e.rps,
                e.latency_us.p50 as i64,
                e.latency_us.p99 as i64,
                add(|a| a.p50),
                add(|a| a.p99),
                fmt(e.cpu_us_per_request),
                fmt(e.upstream_cpu_us_per_request),
                e.errors,
                e.non_2xx,
                e.window.background_cpu_util.unwrap_or(0.0)
            );
        }
        line!(
            "(quiet = proxy with LOG_LEVEL=error, no access line; routed = proxy with an upstreams file of 3 upstreams (the same mock), 30 model patterns and 10 aliases, the model in a weighted tier; limited = the token as a clients-file client with limits and a model list; priced = limited with dollar budgets and PRICES_FILE; shared = limited with REDIS_URL, the limits in Redis; clients1/clients10k = the token as a client without limits, alone or among {})",
            s.clients
        );
        for &conc in &s.plain_concurrency {
            let clients_what = format!("{} clients", s.clients);
            for (base_t, with_t, what) in [
                ("proxy", "limited", "client limits"),
                ("proxy", "routed", "routing by model"),
                ("quiet", "proxy", "access line"),
                ("clients1", "clients10k", clients_what.as_str()),
                ("limited", "priced", "dollar budgets"),
                ("limited", "shared", "limits in Redis"),
            ] {
                let Some((b, bc, w, wc)) = cpu_pair(f.plain, base_t, with_t, conc) else {
                    continue;
                };
                let extra = if with_t == "shared" {
                    format!(
                        ", {:+} us p50, {:+} us p99, {} Redis round trips per request",
                        (w.latency_us.p50 - b.latency_us.p50) as i64,
                        (w.latency_us.p99 - b.latency_us.p99) as i64,
                        fmt2(w.redis_scripts_per_request)
                    )
                } else {
                    String::new()
                };
                let paired = paired_ratio(&b.round_cpu(), &w.round_cpu())
                    .map_or(f64::NAN, |r| (r - 1.0) * 100.0);
                line!(
                    "  c={:<3} {:<16} {:+6.1} us CPU per request ({with_t} {wc:.1} vs {base_t} {bc:.1}; {:+.1}%, paired rounds {paired:+.1}%){extra}",
                    conc,
                    format!("{what}:"),
                    wc - bc,
                    (wc / bc - 1.0) * 100.0
                );
            }
        }
        line!();
    }
    if !f.stream.is_empty() {
        line!(
            "SSE streams (loadgen sse; {} chunks per stream = {} events, 'ms' apart; {}s of new streams per run; rounds: {}, {} for the many-stream run; percentiles = median of rounds, max = max)",
            s.stream_chunks,
            s.stream_chunks + 3,
            s.stream_seconds,
            s.stream_rounds,
            s.many_rounds
        );
        let hdr = format!(
            "{:<tw$} {:>5} {:>4} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>9} {:>6} {:>7} {:>5} {:>5}",
            "target",
            "conc",
            "ms",
            "streams",
            "events",
            "ttfc p50",
            "ttfc p99",
            "+ttfc p50",
            "+ttfc p99",
            "gap p99",
            "gap max",
            "cpu us/chk",
            "peak RSS",
            "errors",
            "non2xx",
            "gen",
            "bg"
        );
        line!("{hdr}");
        line!(
            "{:<tw$} {:>5} {:>4} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>9}",
            "",
            "",
            "",
            "",
            "",
            "ms",
            "ms",
            "ms",
            "ms",
            "ms",
            "ms",
            "",
            "MiB"
        );
        line!("{}", "-".repeat(hdr.len()));
        for e in f.stream {
            let ms = |v: Option<f64>| fmt2(v.map(|v| v / 1000.0));
            line!(
                "{:<tw$} {:>5} {:>4} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>9} {:>6} {:>7} {:>5.2} {:>5.2}",
                e.target,
                e.concurrency,
                e.interval_ms,
                e.streams,
                e.events,
                ms(e.ttfc_us.p50),
                ms(e.ttfc_us.p99),
                ms(e.added_ttfc_us.as_ref().map(|a| a.p50)),
                ms(e.added_ttfc_us.as_ref().map(|a| a.p99)),
                fmt(e.gap_ms.p99),
                fmt(Some(e.gap_ms.max)),
                fmt(e.cpu_us_per_event),
                format!(
                    "{:.1}{}",
                    e.peak_rss_kb as f64 / 1024.0,
                    if e.rss_of == "upstream" { "*" } else { "" }
                ),
                e.errors,
                e.non_2xx,
                e.loadgen_cpu_util,
                e.window.background_cpu_util.unwrap_or(0.0)
            );
        }
        line!(
            "(proxy-h2 = proxy in front of the TLS mock, HTTP/2 by ALPN; its upstream differs, so no +ttfc. * direct: the upstream's own RSS. chk = SSE event forwarded. gen = load generator CPU, 1.0 = one core; bg = CPU used by other processes on the machine, in cores)"
        );
        line!();
    }
    let g = f.growth;
    if !g.streams.is_empty() || !g.clients.is_empty() {
        line!("How cost grows");
        let (lo, hi) = s.rss_reference();
        for (t, sg) in &g.streams {
            if t == "direct" {
                continue;
            }
            let join = |parts: Vec<String>| parts.join(" -> ");
            let steps = &sg.by_streams;
            let mut l = format!(
                "  {t:<10} streams {}: CPU per chunk {} us, peak RSS {} MiB",
                join(steps.iter().map(|x| x.streams.to_string()).collect()),
                join(steps.iter().map(|x| fmt(x.cpu_us_per_event)).collect()),
                join(
                    steps
                        .iter()
                        .map(|x| fmt(Some(x.peak_rss_kb as f64 / 1024.0)))
                        .collect()
                )
            );
            if let (Some(lo), Some(hi)) = (lo, hi)
                && let Some(per) = sg.figures.get(&kb_from_to(lo, hi))
            {
                l.push_str(&format!(
                    "; {per:.1} KB per stream {lo}->{hi}, {} KB per stream from idle",
                    fmt(sg.figures.get(&kb_from_idle(hi)).copied())
                ));
            }
            line!("{l}");
        }
        for (conc, c) in &g.clients {
            line!(
                "  {:<10} clients 1 -> {}, c={conc}: CPU per request {:.1} -> {:.1} us (paired rounds {:+.1}%), p50 {} -> {} us",
                "clients",
                s.clients,
                c.cpu_us_per_request[0],
                c.cpu_us_per_request[1],
                c.ratio.map_or(f64::NAN, |r| (r - 1.0) * 100.0),
                c.p50_us[0] as i64,
                c.p50_us[1] as i64
            );
        }
        line!();
    }
    if let Some(fp) = fp {
        let (su, sn) = (fp.startup_proxy, fp.startup_nginx);
        line!("Footprint");
        line!(
            "{:<7} {:>12} {:>12} {:>16} {:>20} {:>14}",
            "",
            "idle RSS MiB",
            "idle PSS MiB",
            "start: connect ms",
            "start: 1st response ms",
            "binary bytes"
        );
        line!(
            "{:<7} {:>12.1} {:>12.1} {:>16.1} {:>20.1} {:>14}{}",
            "proxy",
            su.idle_rss_kb_median / 1024.0,
            su.idle_pss_kb_median / 1024.0,
            su.connect_ms_median,
            su.first_response_ms_median,
            fp.proxy_binary_bytes,
            if fp.proxy_binary_stripped == Some(true) {
                " (stripped)"
            } else {
                " (NOT stripped)"
            }
        );
        line!(
            "{:<7} {:>12.1} {:>12.1} {:>16.1} {:>20.1} {:>14}{}",
            "nginx",
            sn.idle_rss_kb_median / 1024.0,
            sn.idle_pss_kb_median / 1024.0,
            sn.connect_ms_median,
            sn.first_response_ms_median,
            fp.nginx_binary_bytes,
            format!(
                " (+ shared libs; master + {} workers)",
                fp.nginx_worker_processes
                    .map_or_else(|| "?".to_string(), |n| n.to_string())
            )
        );
        if let Some((prss, ppss, nrss, npss)) = fp.after_load {
            line!(
                "after all load, idle: proxy RSS {:.1} MiB (PSS {:.1}), nginx RSS {:.1} MiB (PSS {:.1})",
                prss as f64 / 1024.0,
                ppss.unwrap_or(0) as f64 / 1024.0,
                nrss as f64 / 1024.0,
                npss as f64 / 1024.0
            );
        }
        line!();
    }
    if let Some(a) = against {
        line!(
            "Against the base binary ({}; current over base, the median of the rounds' ratios, each round's pair run back to back)",
            a.bin
        );
        for r in &a.rows {
            line!("{}", base_line(r));
        }
        line!();
    }
    line!("Targets");
    for t in checks {
        let mark = match t.pass {
            None => "INFO",
            Some(true) => "PASS",
            Some(false) => "FAIL",
        };
        line!(
            "{:<5} {:<62} {:<20} vs {:<18} {}{}",
            format!("{mark}{}", if t.reliable { "" } else { "?" }),
            t.target,
            t.measured,
            t.limit,
            t.ratio
                .map_or_else(String::new, |r| format!("ratio {r:.2}")),
            if t.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", t.note)
            }
        );
    }
    if checks.iter().any(|t| !t.reliable) {
        line!("(PASS?/FAIL?/INFO?: measured while other processes were busy -- see the note)");
    }
    let noisy = f
        .plain
        .iter()
        .map(|e| &e.window)
        .chain(f.stream.iter().map(|e| &e.window))
        .filter(|w| w.background_cpu_util.unwrap_or(0.0) > NOISY_BG)
        .count();
    if noisy > 0 {
        line!();
        line!(
            "WARNING: other processes used > {NOISY_BG:.2} core during {noisy} run(s) (column bg): those figures are noisy."
        );
    }
    o
}
