//! The pool of upstream keys (`AUTH_BEARER=k1,k2,k3`): which key a request uses, which keys rest
//! after a 429 and until when, which the upstream refused and are out of turn until a probe finds
//! them accepted again, and how long the upstream asked us to wait.
//!
//! Keys are known by their position in `AUTH_BEARER` (1 for the first), or in their upstream's
//! `keys_file` or `keys_env`, never by any part of the key: that is what logs and metrics show
//! (the metrics with the upstream's name when the pools come from an upstreams file).
//!
//! An upstream refusal may belong to the request rather than to the key (a restricted key without
//! the scope for one path, a firewall rule, a request larger than the rate limit itself), and one
//! client must never be able to take the keys from the others. So only a probe with the key
//! alone ([`KEY_CHECK_PATH`], see `proxy::probe`) takes a key out of turn, and disabled keys are
//! probed again every [`REPROBE_INTERVAL`] until they are accepted.
//!
//! The pool's state is behind a small interface (`choose`, `rested`, `probed`,
//! `first_usable_at`). With `REDIS_URL`, rests are also shared by replicas ([`share_rests`]):
//! a background task announces each rest of its own to the other replicas at once
//! ([`crate::shared::signals`]), rests the keys they announce, and merges this pool's rests with
//! Redis's now and then as a safety net, so `choose` never waits for Redis.
//! Disabled keys stay per process: a replica finds out with its own probe, and taking a key out
//! for every replica on one replica's word is not worth the risk.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast};
// tokio's clock, so that tests with paused time can step over a rest.
use tokio::time::Instant;
use warp::http::{HeaderMap, HeaderValue, StatusCode};

use crate::config::UpstreamKey;
use crate::ops::metrics::{KeyCounters, KeyState, ProbeOutcome};
use crate::shared::rests::SharedRests;
use crate::shared::signals::{Signal, Signals};

/// How long a key rests after a 429 whose answer names no time.
pub const DEFAULT_REST: Duration = Duration::from_secs(60);

/// How often a replica merges its rests with Redis's. A rest reaches the other replicas as a
/// signal within a round trip; this merge (and the one right after a 429 of its own) is the
/// safety net for a signal missed while a subscriber connection was down: a rest recorded by
/// one replica is respected by the others within this interval plus two round trips at worst.
pub const REST_SYNC_INTERVAL: Duration = Duration::from_millis(500);
/// A test-only knob (not a setting, not in the README's table): [`REST_SYNC_INTERVAL`] in
/// milliseconds, so that a test can show a rest arriving by signal and not by the merge.
pub const TEST_REST_SYNC_VARIABLE: &str = "LLM_PROXY_TEST_REST_SYNC_MS";

/// [`REST_SYNC_INTERVAL`], or the test knob's value.
fn rest_sync_interval() -> Duration {
    std::env::var(TEST_REST_SYNC_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|millis| *millis > 0)
        .map_or(REST_SYNC_INTERVAL, Duration::from_millis)
}

/// What a probe asks for with one key alone, in the caller's terms (`/v1/...`: the upstream
/// base URL stands for `/v1`, and `UPSTREAM_QUERY` is added as to any request). Nearly every
/// OpenAI-compatible provider lists its models for any valid key and nothing else.
pub const KEY_CHECK_PATH: &str = "/v1/models";

/// How often disabled keys are probed again.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(60);
/// A test-only knob (not a setting, not in the README's table): [`REPROBE_INTERVAL`] in
/// milliseconds, so that a test can watch a key come back without waiting a minute.
pub const TEST_REPROBE_VARIABLE: &str = "LLM_PROXY_TEST_KEY_REPROBE_MS";

/// [`REPROBE_INTERVAL`], or the test knob's value.
fn reprobe_interval() -> Duration {
    std::env::var(TEST_REPROBE_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|millis| *millis > 0)
        .map_or(REPROBE_INTERVAL, Duration::from_millis)
}

/// The key a request is sent with.
#[derive(Clone, Debug)]
pub struct KeyChoice {
    /// 1-based position in `AUTH_BEARER`.
    pub position: usize,
    pub header_value: HeaderValue,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    resting_until: Option<Instant>,
    disabled: bool,
    /// A probe of this key is on its way: no second one is started.
    probing: bool,
    /// This replica rested the key (or made its rest longer) and has not told the others yet.
    unannounced: bool,
}

impl Slot {
    fn usable(&self, now: Instant) -> bool {
        !self.disabled && self.resting_until.is_none_or(|until| until <= now)
    }
}

/// The keys and their state. One per `Upstream`; a new one starts with every key in turn.
pub struct KeyPool {
    header_values: Vec<HeaderValue>,
    // A synchronous lock is right here: it is held to read or set a few fields, never across an
    // `.await`.
    slots: Mutex<Vec<Slot>>,
    /// Where the next round-robin scan starts.
    next: AtomicUsize,
    metrics: KeyCounters,
    /// Wakes the rest sync (when there is one) as soon as a key starts resting here.
    rested_here: Arc<Notify>,
    reprobe_every: Duration,
    /// Set once the re-probing of disabled keys runs; it runs for the rest of the pool's life.
    reprobing: AtomicBool,
    /// An upstream of the upstreams file rests even its only key after a 429: other upstreams
    /// can take its requests meanwhile, where the environment's one upstream has nobody else.
    rests_alone: bool,
}

/// What an upstream status means for the key that got it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 429: the key rests and the request may go to another key, unless the answer says the
    /// request can never fit the limit ([`exceeds_the_limit_itself`]).
    RateLimited,
    /// 401: the key is suspect and probed alone; the request may try one other key.
    Unauthorized,
    /// 403: a refusal of this request (a scope, a firewall rule), passed on as it came.
    Forbidden,
    /// Anything else is the answer.
    Answer,
}

impl Verdict {
    pub fn of(status: StatusCode) -> Verdict {
        match status {
            StatusCode::TOO_MANY_REQUESTS => Verdict::RateLimited,
            StatusCode::UNAUTHORIZED => Verdict::Unauthorized,
            StatusCode::FORBIDDEN => Verdict::Forbidden,
            _ => Verdict::Answer,
        }
    }
}

/// What a probe's outcome changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// The key was in turn and the upstream refused it alone: now out of turn.
    Disabled,
    /// The key was out of turn and the upstream accepted it alone: back in turn.
    Restored,
    Unchanged,
}

impl KeyPool {
    pub fn new(keys: &[UpstreamKey], metrics: KeyCounters) -> KeyPool {
        let metrics = metrics.for_keys(keys.len());
        for position in 1..=keys.len() {
            metrics.state(position, KeyState::Usable);
        }
        KeyPool {
            header_values: keys.iter().map(|key| key.header_value.clone()).collect(),
            slots: Mutex::new(vec![Slot::default(); keys.len()]),
            next: AtomicUsize::new(0),
            metrics,
            rested_here: Arc::new(Notify::new()),
            reprobe_every: reprobe_interval(),
            reprobing: AtomicBool::new(false),
            rests_alone: false,
        }
    }

    /// The pool of an upstream that has others beside it (see `rests_alone`).
    pub fn resting_alone(mut self) -> KeyPool {
        self.rests_alone = true;
        self
    }

    /// Whether a key that got a 429 rests: always in a pool of several, and the only key of an
    /// upstream from the upstreams file.
    pub fn rests(&self) -> bool {
        self.fails_over() || self.rests_alone
    }

    pub fn len(&self) -> usize {
        self.header_values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.header_values.is_empty()
    }

    /// The header value that carries the key at `position`, for a probe with it alone.
    pub fn header_value(&self, position: usize) -> Option<HeaderValue> {
        self.header_values.get(position.checked_sub(1)?).cloned()
    }

    /// The next usable key in turn that is not in `tried` (1-based positions), if any.
    pub fn choose(&self, tried: &[usize]) -> Option<KeyChoice> {
        let count = self.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let slots = self.slots.lock();
        (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&index| slots[index].usable(now) && !tried.contains(&(index + 1)))
            .map(|index| {
                self.metrics.request(index + 1);
                KeyChoice {
                    position: index + 1,
                    header_value: self.header_values[index].clone(),
                }
            })
    }

    /// Whether the pool has another key to fail over to. A pool of one keeps the proxy's
    /// behaviour without a pool: its key is never rested or taken out, every request goes to the
    /// upstream, and the upstream's 429, 401 or 403 reaches the caller as it is.
    pub fn fails_over(&self) -> bool {
        self.len() > 1
    }

    /// The key at `position` got a 429: it is not chosen before `until`. Returns whether it rests.
    pub fn rested(&self, position: usize, until: Instant) -> bool {
        self.metrics.rate_limited(position);
        if !self.rests() {
            return false;
        }
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(position - 1) else {
            return false;
        };
        // A later answer naming a shorter rest does not cut a longer one short.
        if slot.resting_until.is_none_or(|old| old < until) {
            slot.resting_until = Some(until);
            slot.unannounced = true;
        }
        self.metrics.state(position, KeyState::Resting);
        drop(slots);
        // A permit is kept if the sync is busy, so this rest is not missed.
        self.rested_here.notify_one();
        true
    }

    /// What is left of each key's rest, in pool order (zero: usable, or disabled here).
    fn remaining_rests(&self) -> Vec<Duration> {
        let now = Instant::now();
        self.slots
            .lock()
            .iter()
            .map(|slot| match slot.resting_until {
                Some(until) if !slot.disabled => until.saturating_duration_since(now),
                _ => Duration::ZERO,
            })
            .collect()
    }

    /// The rests this replica recorded since it last asked, to announce: (0-based index,
    /// remaining), each taken once.
    fn take_unannounced(&self) -> Vec<(usize, Duration)> {
        let now = Instant::now();
        let mut slots = self.slots.lock();
        slots
            .iter_mut()
            .enumerate()
            .filter_map(|(index, slot)| {
                if !std::mem::take(&mut slot.unannounced) {
                    return None;
                }
                let rest = slot.resting_until?.saturating_duration_since(now);
                (!rest.is_zero()).then_some((index, rest))
            })
            .collect()
    }

    /// Rests other replicas recorded, as remaining times in pool order: each key rests until
    /// the later of its own rest and theirs.
    fn rests_seen(&self, theirs: &[Duration]) {
        for (index, rest) in theirs.iter().enumerate() {
            self.rest_heard(index, *rest);
        }
    }

    /// Another replica rested the key at `index` (0-based) for `rest` from now: it rests until
    /// the later of its own rest and theirs, so hearing one rest twice changes nothing.
    fn rest_heard(&self, index: usize, rest: Duration) {
        if rest.is_zero() {
            return;
        }
        // Whatever Redis holds (a stray key, another version's), no longer than any answer
        // could have asked for here.
        let until = Instant::now() + rest.min(MAX_REST);
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(index) {
            slot.resting_until = Some(slot.resting_until.map_or(until, |old| old.max(until)));
        }
    }

    /// Starts a probe of the key at `position` unless one is on its way (or the pool has one key,
    /// which is never taken out). Returns whether the caller is to probe; it reports with
    /// [`KeyPool::probed`].
    pub fn begin_probe(&self, position: usize) -> bool {
        if !self.fails_over() {
            return false;
        }
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(position - 1) else {
            return false;
        };
        !std::mem::replace(&mut slot.probing, true)
    }

    /// The probe of the key at `position` ended with `outcome`: refused alone (401), the key is
    /// out of turn; accepted alone, it is back in turn; anything else (another status, no answer)
    /// proves nothing about the key and changes nothing.
    pub fn probed(&self, position: usize, outcome: ProbeOutcome) -> KeyChange {
        self.metrics.probe(position, outcome);
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(position - 1) else {
            return KeyChange::Unchanged;
        };
        slot.probing = false;
        let change = match (outcome, slot.disabled) {
            (ProbeOutcome::Refused, false) => KeyChange::Disabled,
            (ProbeOutcome::Accepted, true) => KeyChange::Restored,
            _ => return KeyChange::Unchanged,
        };
        slot.disabled = change == KeyChange::Disabled;
        let now = Instant::now();
        let state = match slot {
            Slot { disabled: true, .. } => KeyState::Disabled,
            slot if slot.usable(now) => KeyState::Usable,
            _ => KeyState::Resting,
        };
        self.metrics.state(position, state);
        change
    }

    /// The positions of the keys out of turn.
    pub fn disabled_keys(&self) -> Vec<usize> {
        self.slots
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.disabled)
            .map(|(index, _)| index + 1)
            .collect()
    }

    /// Whether the caller is to start the re-probing of disabled keys: true once per pool.
    pub fn start_reprobing(&self) -> bool {
        !self.reprobing.swap(true, Ordering::Relaxed)
    }

    /// How long the re-probing waits between rounds.
    pub fn reprobe_every(&self) -> Duration {
        self.reprobe_every
    }

    /// When the first key is usable: now or earlier if one is, `None` if every key is disabled.
    pub fn first_usable_at(&self) -> Option<Instant> {
        let now = Instant::now();
        self.slots
            .lock()
            .iter()
            .filter(|slot| !slot.disabled)
            .map(|slot| slot.resting_until.map_or(now, |until| until.max(now)))
            .min()
    }

    /// Whether some key may be used at `now`.
    pub fn usable_at(&self, now: Instant) -> bool {
        self.slots.lock().iter().any(|slot| slot.usable(now))
    }

    /// Every key by position: `usable`, `resting` (and until when) or `disabled`.
    pub fn states(&self) -> Vec<(usize, &'static str, Option<Instant>)> {
        let now = Instant::now();
        self.slots
            .lock()
            .iter()
            .enumerate()
            .map(|(index, slot)| {
                if slot.disabled {
                    (index + 1, "disabled", None)
                } else if slot.usable(now) {
                    (index + 1, "usable", None)
                } else {
                    (index + 1, "resting", slot.resting_until)
                }
            })
            .collect()
    }

    /// Whether any key is still in turn (resting keys come back by themselves); an upstream
    /// without keys needs none.
    pub fn any_enabled(&self) -> bool {
        self.is_empty() || self.slots.lock().iter().any(|slot| !slot.disabled)
    }

    /// Brings the per-key state gauges up to date (a rest ends by the clock, not by an event);
    /// called before the metrics are encoded.
    pub fn publish_state(&self) {
        let now = Instant::now();
        let slots = self.slots.lock();
        for (index, slot) in slots.iter().enumerate() {
            let state = if slot.disabled {
                KeyState::Disabled
            } else if slot.usable(now) {
                KeyState::Usable
            } else {
                KeyState::Resting
            };
            self.metrics.state(index + 1, state);
        }
    }
}

/// Shares the pool's rests through Redis: a background task, ended when the pool is dropped,
/// announces each rest of this replica's as a signal and merges right after it, rests the keys
/// other replicas announce, and merges every `REST_SYNC_INTERVAL` too (the safety net for a
/// signal missed while the subscriber was reconnecting). A pool of one key that never rests
/// has nothing to share.
pub fn share_rests(pool: &Arc<KeyPool>, rests: SharedRests, signals: &Signals) {
    if pool.rests() {
        signals.track_rests(rests.names());
        tokio::spawn(sync_rests(
            Arc::downgrade(pool),
            pool.rested_here.clone(),
            rests,
            signals.clone(),
        ));
    }
}

/// What woke the rest sync.
enum Wake {
    RestedHere,
    Tick,
    Heard(Result<Signal, broadcast::error::RecvError>),
}

async fn sync_rests(
    pool: Weak<KeyPool>,
    rested_here: Arc<Notify>,
    rests: SharedRests,
    signals: Signals,
) {
    let mut heard = signals.subscribe();
    let mut hearing = true;
    // The first tick is at once: the merge on start reads the rests already in Redis.
    let mut tick = tokio::time::interval(rest_sync_interval());
    // A burst of signals must not hold the merge back, nor bring a burst of merges after it.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            () = rested_here.notified() => Wake::RestedHere,
            _ = tick.tick() => Wake::Tick,
            heard = heard.recv(), if hearing => Wake::Heard(heard),
        };
        let Some(pool) = pool.upgrade() else {
            return;
        };
        match wake {
            Wake::Heard(Ok(Signal::KeyRest { key, remaining })) => {
                if let Some(index) = rests.names().iter().position(|name| *name == key) {
                    pool.rest_heard(index, remaining);
                }
                continue;
            }
            Wake::Heard(Ok(Signal::BreakerOpened { .. })) => continue,
            Wake::Heard(Err(broadcast::error::RecvError::Closed)) => {
                hearing = false;
                continue;
            }
            // Signals were missed: the merge below reads what they said.
            Wake::Heard(Err(broadcast::error::RecvError::Lagged(_))) | Wake::Tick => {}
            Wake::RestedHere => {
                let announced = pool
                    .take_unannounced()
                    .into_iter()
                    .filter_map(|(index, rest)| {
                        let key = rests.names().get(index)?.clone();
                        Some(Signal::KeyRest {
                            key,
                            remaining: rest,
                        })
                    });
                // In local mode each returns at once; the merge is what carries a rest
                // across an outage.
                let signals = &signals;
                futures::future::join_all(announced.map(|signal| async move {
                    let _ = signals.publish(&signal).await;
                }))
                .await;
            }
        }
        // In local mode this returns at once; the rests stay this replica's own.
        if let Ok(theirs) = rests.merge(&pool.remaining_rests()).await {
            pool.rests_seen(&theirs);
        }
    }
}

/// How much of a 429's body is read to decide whether the request can ever fit: OpenAI's error
/// bodies are a few hundred bytes; a longer body is not one of them.
pub const RATE_LIMIT_BODY_READ: usize = 16 * 1024;

/// Whether a 429's body says the request is larger than the limit itself, so no key and no wait
/// could serve it: OpenAI's `{"error":{"message":"Request too large for gpt-4o ... Limit 30000,
/// Requested 45000. ..."}}`. An ordinary rate limit names a request that fits (`Limit 30000,
/// Used 29000, Requested 2000`) and is not one.
pub fn exceeds_the_limit_itself(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        message: String,
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return false;
    };
    let message = answer.error.message;
    let number_after = |label: &str| -> Option<u64> {
        let start = message.find(label)? + label.len();
        let digits: String = message[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    match (number_after("Limit "), number_after("Requested ")) {
        (Some(limit), Some(requested)) => requested > limit,
        _ => false,
    }
}

/// `Retry-After` for a moment: whole seconds from now, rounded up, at least 1.
pub fn retry_after_secs(at: Instant) -> u64 {
    let wait = at.saturating_duration_since(Instant::now());
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// The longest rest an upstream answer can impose: a garbled or hostile `Retry-After` must not
/// bench a key for years (nor overflow the clock).
pub const MAX_REST: Duration = Duration::from_secs(60 * 60);

/// How long the upstream asked a rate-limited key to wait, from the first of these it sent:
/// `retry-after-ms`, `Retry-After` (seconds or an HTTP date, relative to `now`), else OpenAI's
/// `x-ratelimit-reset-requests` / `-tokens` (`6m0s`, `1.5s`, `20ms`): the one whose
/// `x-ratelimit-remaining-*` is 0, or the longer of the two when neither says so.
/// At most `MAX_REST`.
pub fn rest_duration(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    named_rest(headers, now).map(|rest| rest.min(MAX_REST))
}

fn named_rest(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(ms) = text("retry-after-ms").and_then(|ms| ms.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(MAX_REST));
    }
    if let Some(value) = text("retry-after").map(str::trim) {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Ok(date) = httpdate::parse_http_date(value) {
            return Some(date.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let reset = |kind: &str| text(&format!("x-ratelimit-reset-{kind}")).and_then(go_duration);
    let exhausted = |kind: &str| {
        text(&format!("x-ratelimit-remaining-{kind}")).is_some_and(|left| left.trim() == "0")
    };
    let (requests, tokens) = (reset("requests"), reset("tokens"));
    let named: Vec<Duration> = [("requests", requests), ("tokens", tokens)]
        .into_iter()
        .filter(|(kind, _)| exhausted(kind))
        .filter_map(|(_, reset)| reset)
        .collect();
    if named.is_empty() {
        requests.into_iter().chain(tokens).max()
    } else {
        named.into_iter().max()
    }
}

/// A duration as Go prints it (`1h2m3.5s`, `6m0s`, `250ms`, `1.5s`); `None` if it is not one.
fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::ops::metrics::Metrics;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    warp::http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    fn pool(count: usize) -> KeyPool {
        let keys: Vec<UpstreamKey> = (1..=count)
            .map(|n| UpstreamKey {
                key: Secret::new(format!("k{n}")),
                header_value: HeaderValue::from_str(&format!("Bearer k{n}")).unwrap(),
            })
            .collect();
        KeyPool::new(&keys, Metrics::new().key_counters(None))
    }

    #[test]
    fn rest_times_are_read_from_every_header_the_providers_use() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let rest = |pairs| rest_duration(&headers(pairs), now);
        assert_eq!(rest(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            rest(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            Some(Duration::from_millis(1500))
        );
        let in_90_s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let date = HeaderValue::from_str(&in_90_s).unwrap();
        let mut dated = HeaderMap::new();
        dated.insert("retry-after", date);
        assert_eq!(rest_duration(&dated, now), Some(Duration::from_secs(90)));
        assert_eq!(
            rest(&[("retry-after", "Tue, 14 Nov 2000 00:00:00 GMT")]),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            rest(&[("x-ratelimit-reset-requests", "6m0s")]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            rest(&[
                ("x-ratelimit-reset-requests", "1.5s"),
                ("x-ratelimit-reset-tokens", "20ms")
            ]),
            Some(Duration::from_millis(1500)),
            "neither exhausted: the longer"
        );
        assert_eq!(
            rest(&[
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-reset-tokens", "20ms"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-remaining-requests", "12"),
            ]),
            Some(Duration::from_millis(20)),
            "the exhausted limit's reset"
        );
        assert_eq!(rest(&[("retry-after", "soon")]), None);
        assert_eq!(rest(&[]), None);
    }

    #[test]
    fn go_durations_parse_as_go_prints_them() {
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "1x", "-1s", "1..2s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_used_in_turn_and_resting_or_disabled_keys_are_skipped() {
        let pool = pool(3);
        let turn: Vec<usize> = (0..4).map(|_| pool.choose(&[]).unwrap().position).collect();
        assert_eq!(turn, [1, 2, 3, 1]);
        assert!(pool.rested(2, Instant::now() + Duration::from_secs(10)));
        assert!(pool.begin_probe(3));
        assert_eq!(pool.probed(3, ProbeOutcome::Refused), KeyChange::Disabled);
        assert!(pool.begin_probe(3));
        assert_eq!(
            pool.probed(3, ProbeOutcome::Refused),
            KeyChange::Unchanged,
            "disabled once, logged once"
        );
        let turn: Vec<usize> = (0..3).map(|_| pool.choose(&[]).unwrap().position).collect();
        assert_eq!(turn, [1, 1, 1]);
        assert!(pool.choose(&[1]).is_none(), "no key twice for one request");
        assert_eq!(pool.first_usable_at(), Some(Instant::now()));
        assert_eq!(pool.disabled_keys(), [3]);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pool.choose(&[1]).unwrap().position, 2, "the rest is over");
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_refused_probe_disables_and_only_an_accepted_one_restores() {
        let pool = pool(2);
        for outcome in [ProbeOutcome::Accepted, ProbeOutcome::Inconclusive] {
            assert!(pool.begin_probe(1));
            assert_eq!(pool.probed(1, outcome), KeyChange::Unchanged, "{outcome:?}");
        }
        assert!(pool.disabled_keys().is_empty());
        assert!(pool.begin_probe(1));
        assert!(!pool.begin_probe(1), "one probe of a key at a time");
        assert_eq!(pool.probed(1, ProbeOutcome::Refused), KeyChange::Disabled);
        for outcome in [ProbeOutcome::Refused, ProbeOutcome::Inconclusive] {
            assert!(pool.begin_probe(1));
            assert_eq!(pool.probed(1, outcome), KeyChange::Unchanged, "{outcome:?}");
        }
        assert_eq!(pool.disabled_keys(), [1]);
        assert!(pool.begin_probe(1));
        assert_eq!(pool.probed(1, ProbeOutcome::Accepted), KeyChange::Restored);
        assert!(pool.disabled_keys().is_empty());
        assert!(pool.start_reprobing());
        assert!(!pool.start_reprobing(), "one re-probing per pool");
    }

    #[tokio::test(start_paused = true)]
    async fn first_usable_at_is_the_end_of_the_shortest_rest() {
        let pool = pool(2);
        let now = Instant::now();
        pool.rested(1, now + Duration::from_secs(30));
        pool.rested(2, now + Duration::from_secs(5));
        pool.rested(2, now + Duration::from_secs(1));
        assert!(pool.choose(&[]).is_none());
        assert_eq!(pool.first_usable_at(), Some(now + Duration::from_secs(5)));
        assert_eq!(retry_after_secs(now + Duration::from_millis(4500)), 5);
        for position in [1, 2] {
            assert!(pool.begin_probe(position));
            assert_eq!(
                pool.probed(position, ProbeOutcome::Refused),
                KeyChange::Disabled
            );
        }
        assert_eq!(pool.first_usable_at(), None);
        assert!(!pool.any_enabled());
    }

    #[test]
    fn no_answer_rests_a_key_past_the_cap_or_overflows_the_clock() {
        let now = SystemTime::now();
        for hostile in [
            headers(&[("retry-after-ms", "1e300")]),
            headers(&[("retry-after", "18446744073709551615")]),
            headers(&[("x-ratelimit-reset-requests", "99999999999999h")]),
        ] {
            let rest = rest_duration(&hostile, now).unwrap();
            assert_eq!(rest, MAX_REST, "{hostile:?}");
            // What the proxy does with it next: a deadline on tokio's clock.
            let _ = Instant::now() + rest;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_key_is_never_benched() {
        let pool = pool(1);
        assert!(!pool.rested(1, Instant::now() + Duration::from_secs(30)));
        assert!(!pool.begin_probe(1), "a single key is never probed");
        assert_eq!(pool.choose(&[]).unwrap().position, 1);
        assert!(pool.any_enabled());
    }

    #[test]
    fn a_request_larger_than_the_limit_itself_is_told_from_a_rate_limit() {
        let body = |message: &str| {
            serde_json::json!({"error": {
                "message": message, "type": "tokens", "param": null, "code": "rate_limit_exceeded"
            }})
            .to_string()
        };
        assert!(exceeds_the_limit_itself(
            body(
                "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): \
                 Limit 30000, Requested 45000. The input or output tokens must be reduced in \
                 order to run successfully."
            )
            .as_bytes()
        ));
        for fits in [
            "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): \
             Limit 30000, Used 29000, Requested 2000. Please try again in 2s.",
            "Request too large: Limit 30000, Requested 30000.",
            "Request too large for gpt-4o",
            "Limit 30000",
            "Requested 45000",
        ] {
            assert!(!exceeds_the_limit_itself(body(fits).as_bytes()), "{fits}");
        }
        for not_openai in [
            &b""[..],
            b"Request too large: Limit 1, Requested 2",
            b"{\"error\":\"Limit 1, Requested 2\"}",
        ] {
            assert!(!exceeds_the_limit_itself(not_openai));
        }
    }
}
