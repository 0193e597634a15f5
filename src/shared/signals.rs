//! Signals between replicas (`REDIS_URL`): an upstream key rested after a 429 and an upstream's
//! breaker opened reach every other replica within one Redis round trip, through one pub/sub
//! channel, [`CHANNEL`], rather than at the next merge of the rests.
//!
//! Sending is one script through [`Shared::eval`] ([`Signals::publish`]), so it is bounded by
//! `REDIS_TIMEOUT_MS` and skipped in local mode like every other call. A breaker opening also
//! leaves its state behind in the same round trip, `llm-proxy:{health}:breaker:<upstream>`
//! (the reopenings, expiring when the opening ends) with its name in the index
//! [`BREAKER_INDEX`], for the replicas that start later; a rest already lives in its own key
//! (see [`super::rests`]).
//!
//! Receiving takes one connection of its own per replica (a subscribed connection can do nothing
//! else), PINGed every `PROBE_INTERVAL` so that one that died silently is noticed too. When it
//! drops it is opened again, waiting longer after each failure up to [`LAST_RETRY`]; every drop
//! and failed attempt counts in `llm_proxy_redis_failures_total`. On start and after each
//! reconnect, once subscribed (so nothing sent meanwhile is missed) and before any message is
//! handed on, it reads the current state: the open breakers, and the rests of the keys of every
//! live pool (the rests' merge, with no rest of its own). That state goes to the subscribers as
//! signals, then the messages follow.
//!
//! A message says which replica sent it, and a replica skips its own. Every consumer keeps the
//! later end of what it hears, so hearing the same thing twice (from the state read, then as a
//! message) changes nothing. Times travel as remaining milliseconds, never clock readings, so
//! the replicas' clocks do not matter. A message never holds an upstream key: a rest names its
//! key by the rest key, a hash.
//!
//! The text of a message, version first so that a replica of another version can skip what it
//! does not read: `1|<replica>|rest|<ms>|<rest key>` and
//! `1|<replica>|breaker|<ms>|<reopenings>|<upstream>` (the name last: it may hold a `|`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use redis::aio::{PubSubSink, PubSubStream};
use redis::{Msg, Script};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::rests::{MERGE, millis};
use super::{CONNECT_TIMEOUT, PROBE_INTERVAL, Shared, Unavailable, is_connection_failure};
use crate::ops::metrics::RedisFailure;

/// The one channel every replica sends to and listens on.
pub const CHANNEL: &str = "llm-proxy:{health}:events";
/// An open breaker's key is this followed by the upstream's name.
pub const BREAKER_PREFIX: &str = "llm-proxy:{health}:breaker:";
/// The names of the breakers that may be open (a set), so that a replica that starts reads them
/// without scanning the keyspace.
pub const BREAKER_INDEX: &str = "llm-proxy:{health}:breakers";

const VERSION: &str = "1";
/// Signals waiting for a slow subscriber; one that falls further behind is told it lagged.
const QUEUE: usize = 1024;
/// The first wait before opening the subscriber connection again; it doubles up to
/// [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
pub const LAST_RETRY: Duration = Duration::from_secs(5);
/// How long a fresh connection waits for the shared mode to read the state (the probe turns it
/// shared within a second of Redis answering); past it the connection starts over.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(5);

/// What one replica tells the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The upstream key named by its rest key ([`super::rests::rest_key`]) rests for
    /// `remaining`.
    KeyRest { key: String, remaining: Duration },
    /// The upstream's breaker opened for `remaining`, after `reopenings` failed probes.
    BreakerOpened {
        upstream: String,
        remaining: Duration,
        reopenings: u32,
    },
}

/// A breaker opening heard from another replica, on this replica's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opening {
    pub until: Instant,
    pub reopenings: u32,
}

/// The signals of this replica. Cloning is shallow. Without `REDIS_URL` it sends and hears
/// nothing.
#[derive(Clone)]
pub struct Signals(Arc<Inner>);

struct Inner {
    shared: Shared,
    /// Tags this replica's messages, so that it skips them when they come back.
    replica: String,
    sender: broadcast::Sender<Signal>,
    announce: Script,
    breakers: Script,
    merge: Script,
    /// The rest keys of every live key pool, read on each (re)connect.
    pools: Mutex<Vec<Weak<[String]>>>,
    /// The latest opening heard of each upstream's breaker, for a breaker made after it came
    /// (a reload): synchronous locks, held to read or write a few fields.
    openings: Mutex<HashMap<String, Opening>>,
    /// Becomes true once the subscriber has subscribed and handed on the state.
    caught_up: watch::Sender<bool>,
}

impl Signals {
    /// With `REDIS_URL`, starts the subscriber in the background (so this needs a tokio runtime);
    /// it ends when the last handle is dropped.
    pub fn new(shared: &Shared) -> Signals {
        // The queue's slots are allocated up front (72 KiB for 1024): without Redis nothing is
        // ever delivered, so one slot stands in for them.
        let queue = if shared.is_configured() { QUEUE } else { 1 };
        let (sender, _) = broadcast::channel(queue);
        let signals = Signals(Arc::new(Inner {
            shared: shared.clone(),
            replica: replica_id(),
            sender,
            announce: Script::new(include_str!("signal.lua")),
            breakers: Script::new(include_str!("breakers.lua")),
            merge: Script::new(MERGE),
            pools: Mutex::new(Vec::new()),
            openings: Mutex::new(HashMap::new()),
            caught_up: watch::Sender::new(false),
        }));
        if let Some(redis) = &shared.0.redis {
            tokio::spawn(listen(Arc::downgrade(&signals.0), redis.client.clone()));
        }
        signals
    }

    /// Every signal heard from another replica from now on, and the state read on each
    /// (re)connect. A receiver that falls more than a thousand signals behind is told it lagged:
    /// it then has to read the state itself (the rests' merge).
    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.0.sender.subscribe()
    }

    /// Includes the rests of `names` (rest keys) in the state read on each (re)connect, for as
    /// long as `names` lives.
    pub fn track_rests(&self, names: &Arc<[String]>) {
        let mut pools = self.0.pools.lock();
        pools.retain(|pool| pool.strong_count() > 0);
        pools.push(Arc::downgrade(names));
    }

    /// The latest opening of `upstream`'s breaker heard from another replica, if it has not
    /// ended: for a breaker made after the signal came.
    pub fn last_opening(&self, upstream: &str) -> Option<Opening> {
        let openings = self.0.openings.lock();
        openings
            .get(upstream)
            .copied()
            .filter(|opening| opening.until > Instant::now())
    }

    /// Resolves once the subscriber has subscribed and handed on the state read then (at once
    /// without `REDIS_URL`). Bounded by the caller.
    pub async fn caught_up(&self) {
        if !self.0.shared.is_configured() {
            return;
        }
        let mut caught_up = self.0.caught_up.subscribe();
        let _ = caught_up.wait_for(|done| *done).await;
    }

    /// Tells every other replica, in one round trip; a breaker opening is also written for the
    /// replicas that start later. `Unavailable` in local mode or when Redis did not answer: the
    /// others then learn of a rest at the next merge, and of a breaker not at all.
    pub async fn publish(&self, signal: &Signal) -> Result<(), Unavailable> {
        let mut invocation = self.0.announce.prepare_invoke();
        invocation.arg(CHANNEL).arg(encode(&self.0.replica, signal));
        if let Signal::BreakerOpened {
            upstream,
            remaining,
            reopenings,
        } = signal
        {
            invocation
                .key(format!("{BREAKER_PREFIX}{upstream}"))
                .key(BREAKER_INDEX)
                .arg(upstream)
                .arg(reopenings)
                .arg(millis(*remaining).max(1));
        }
        let _listeners: i64 = self.0.shared.eval(&invocation).await?;
        Ok(())
    }

    /// [`Signals::publish`] in the background, for a caller on the request path.
    pub fn announce(&self, signal: Signal) {
        if !self.0.shared.is_configured() {
            return;
        }
        let signals = self.clone();
        tokio::spawn(async move {
            let _ = signals.publish(&signal).await;
        });
    }
}

impl Inner {
    /// Hands a signal to the subscribers (none listening is not an error: nothing needs it).
    fn deliver(&self, signal: Signal) {
        if let Signal::BreakerOpened {
            upstream,
            remaining,
            reopenings,
        } = &signal
        {
            let now = Instant::now();
            let until = now + *remaining;
            let mut openings = self.openings.lock();
            openings.retain(|_, opening| opening.until > now);
            let opening = openings.entry(upstream.clone()).or_insert(Opening {
                until,
                reopenings: *reopenings,
            });
            if until > opening.until {
                *opening = Opening {
                    until,
                    reopenings: *reopenings,
                };
            }
        }
        let _ = self.sender.send(signal);
    }

    /// Opens the subscriber connection and subscribes, bounded.
    async fn connect(
        &self,
        client: &redis::Client,
    ) -> Result<(PubSubSink, PubSubStream), (RedisFailure, String)> {
        let bound = CONNECT_TIMEOUT + self.timeout();
        let subscribe = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        match tokio::time::timeout(bound, subscribe).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) => Err((failure_kind(&err), self.mask(&err))),
            Err(_) => Err((
                RedisFailure::Timeout,
                format!("not subscribed within {} ms", bound.as_millis()),
            )),
        }
    }

    /// Reads the open breakers and the rests of the live pools, and hands them on.
    async fn catch_up(&self) -> Result<(), Unavailable> {
        let mut invocation = self.breakers.prepare_invoke();
        invocation.key(BREAKER_INDEX).arg(BREAKER_PREFIX);
        let open: Vec<String> = self.shared.eval(&invocation).await?;
        let mut heard = Vec::new();
        for opening in open.chunks_exact(3) {
            let (Ok(reopenings), Ok(ms)) = (opening[1].parse(), opening[2].parse()) else {
                continue;
            };
            heard.push(Signal::BreakerOpened {
                upstream: opening[0].clone(),
                remaining: Duration::from_millis(ms),
                reopenings,
            });
        }
        let mut names: Vec<String> = {
            let mut pools = self.pools.lock();
            pools.retain(|pool| pool.strong_count() > 0);
            pools
                .iter()
                .filter_map(Weak::upgrade)
                .flat_map(|names| names.to_vec())
                .collect()
        };
        names.sort();
        names.dedup();
        if !names.is_empty() {
            let mut invocation = self.merge.prepare_invoke();
            for name in &names {
                invocation.key(name);
            }
            // The slack, then no rest of this replica's: a read.
            invocation.arg(0);
            for _ in &names {
                invocation.arg(0);
            }
            let rests: Vec<u64> = self.shared.eval(&invocation).await?;
            for (name, ms) in names.into_iter().zip(rests) {
                if ms > 0 {
                    heard.push(Signal::KeyRest {
                        key: name,
                        remaining: Duration::from_millis(ms),
                    });
                }
            }
        }
        for signal in heard {
            self.deliver(signal);
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.shared
            .0
            .redis
            .as_ref()
            .map_or(Duration::ZERO, |redis| redis.timeout)
    }

    fn mask(&self, err: &redis::RedisError) -> String {
        self.shared
            .0
            .redis
            .as_ref()
            .map_or_else(|| err.to_string(), |redis| redis.mask(err))
    }
}

/// How a subscriber connection ended.
enum Ended {
    /// Every handle is gone: nothing listens any more.
    Dropped,
    /// Redis closed it, stopped answering its PING, or the state could not be read.
    Lost(RedisFailure, String),
}

/// The subscriber: connects, catches up, hands on messages, and connects again when the
/// connection is lost, until the last handle is dropped.
async fn listen(inner: Weak<Inner>, client: redis::Client) {
    // The state is read through the shared connection: wait for the probe's first answer.
    match inner.upgrade() {
        Some(strong) => strong.shared.clone().first_contact().await,
        None => return,
    }
    let mut retry = FIRST_RETRY;
    let mut was_lost = false;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let connected = strong.connect(&client).await;
        drop(strong);
        let (failure, reason) = match connected {
            Ok((sink, stream)) => match relay(&inner, sink, stream, &mut retry, was_lost).await {
                Ended::Dropped => return,
                Ended::Lost(failure, reason) => (failure, reason),
            },
            Err(lost) => lost,
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.shared.0.metrics.redis_failure(failure);
        if !was_lost {
            log::warn!(
                "no signals from other replicas (Redis pub/sub): {reason}; connecting again \
                 (key rests still reach this replica at the next merge)"
            );
        } else {
            log::debug!("signals: still no subscriber connection: {reason}");
        }
        was_lost = true;
        drop(strong);
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LAST_RETRY);
    }
}

/// One connection's life: the state first, then every message, PINGing while it is quiet.
async fn relay(
    inner: &Weak<Inner>,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    retry: &mut Duration,
    was_lost: bool,
) -> Ended {
    // Messages sent meanwhile wait in the connection's queue and follow the state.
    let started = Instant::now();
    loop {
        let Some(strong) = inner.upgrade() else {
            return Ended::Dropped;
        };
        match strong.catch_up().await {
            Ok(()) => {
                strong.caught_up.send_replace(true);
                break;
            }
            Err(Unavailable) if started.elapsed() < CATCH_UP_LIMIT => {}
            Err(Unavailable) => {
                return Ended::Lost(
                    RedisFailure::Timeout,
                    "the state could not be read (shared state mode is local)".to_string(),
                );
            }
        }
        drop(strong);
        tokio::time::sleep(FIRST_RETRY).await;
    }
    *retry = FIRST_RETRY;
    if was_lost {
        log::info!("signals from other replicas (Redis pub/sub) resumed");
    }
    let mut ping = tokio::time::interval(PROBE_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    return Ended::Lost(RedisFailure::Connection, "connection closed".to_string());
                };
                let Some(strong) = inner.upgrade() else {
                    return Ended::Dropped;
                };
                match decode(&message) {
                    Some((replica, _)) if replica == strong.replica => {}
                    Some((_, signal)) => strong.deliver(signal),
                    None => log::debug!("signals: skipped a message this version does not read"),
                }
            }
            _ = ping.tick() => {
                let Some(strong) = inner.upgrade() else {
                    return Ended::Dropped;
                };
                let bound = CONNECT_TIMEOUT + strong.timeout();
                drop(strong);
                // Any answer will do: a subscribed RESP2 connection answers `["pong", ""]`,
                // not `PONG`.
                match tokio::time::timeout(bound, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        let Some(strong) = inner.upgrade() else {
                            return Ended::Dropped;
                        };
                        return Ended::Lost(failure_kind(&err), strong.mask(&err));
                    }
                    Err(_) => {
                        return Ended::Lost(
                            RedisFailure::Timeout,
                            format!("no answer to PING within {} ms", bound.as_millis()),
                        );
                    }
                }
            }
        }
    }
}

fn failure_kind(err: &redis::RedisError) -> RedisFailure {
    if err.is_timeout() {
        RedisFailure::Timeout
    } else if is_connection_failure(err) {
        RedisFailure::Connection
    } else {
        RedisFailure::Error
    }
}

/// 64 random bits in hex: the standard library's per-process random hash keys, mixed with the
/// process id, so that two replicas on one host differ too.
fn replica_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

fn encode(replica: &str, signal: &Signal) -> String {
    match signal {
        Signal::KeyRest { key, remaining } => {
            format!("{VERSION}|{replica}|rest|{}|{key}", millis(*remaining))
        }
        Signal::BreakerOpened {
            upstream,
            remaining,
            reopenings,
        } => format!(
            "{VERSION}|{replica}|breaker|{}|{reopenings}|{upstream}",
            millis(*remaining)
        ),
    }
}

/// The sending replica and the signal; `None` for a message this version does not read.
fn decode(message: &Msg) -> Option<(String, Signal)> {
    let text = std::str::from_utf8(message.get_payload_bytes()).ok()?;
    decode_text(text)
}

fn decode_text(text: &str) -> Option<(String, Signal)> {
    let mut fields = text.splitn(4, '|');
    if fields.next()? != VERSION {
        return None;
    }
    let replica = fields.next()?.to_string();
    let kind = fields.next()?;
    let rest = fields.next()?;
    let signal = match kind {
        "rest" => {
            let (ms, key) = rest.split_once('|')?;
            Signal::KeyRest {
                key: key.to_string(),
                remaining: Duration::from_millis(ms.parse().ok()?),
            }
        }
        "breaker" => {
            let mut fields = rest.splitn(3, '|');
            let ms = fields.next()?.parse().ok()?;
            let reopenings = fields.next()?.parse().ok()?;
            Signal::BreakerOpened {
                upstream: fields.next()?.to_string(),
                remaining: Duration::from_millis(ms),
                reopenings,
            }
        }
        _ => return None,
    };
    Some((replica, signal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_read_back_as_they_were_written() {
        let signals = [
            Signal::KeyRest {
                key: "llm-proxy:{keys}:rest:0123456789abcdef".to_string(),
                remaining: Duration::from_millis(30_000),
            },
            Signal::BreakerOpened {
                upstream: "azure|eu".to_string(),
                remaining: Duration::from_millis(10_000),
                reopenings: 2,
            },
        ];
        for signal in signals {
            let text = encode("00000000000000ff", &signal);
            assert_eq!(
                decode_text(&text),
                Some(("00000000000000ff".to_string(), signal)),
                "{text}"
            );
        }
        assert_eq!(
            encode(
                "r",
                &Signal::BreakerOpened {
                    upstream: "openai".to_string(),
                    remaining: Duration::from_micros(1500),
                    reopenings: 0,
                }
            ),
            "1|r|breaker|2|0|openai",
            "compact, and a remaining time never rounds down"
        );
    }

    #[test]
    fn messages_of_another_version_or_shape_are_skipped() {
        for text in [
            "",
            "2|r|rest|100|llm-proxy:{keys}:rest:00",
            "1|r|rest|soon|llm-proxy:{keys}:rest:00",
            "1|r|rest|100",
            "1|r|breaker|100|x|openai",
            "1|r|breaker|100|1",
            "1|r|opened|100|1|openai",
        ] {
            assert_eq!(decode_text(text), None, "{text}");
        }
    }

    #[test]
    fn replicas_have_different_ids() {
        assert_ne!(replica_id(), replica_id());
        assert_eq!(replica_id().len(), 16);
    }
}
