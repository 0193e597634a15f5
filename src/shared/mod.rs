//! State shared across replicas, kept in Redis (`REDIS_URL`): the upstream key rests
//! ([`rests`]), the per-client limits and budgets ([`crate::policy::redis`]), the status page's
//! last hour ([`activity`]), and the signals
//! that tell every replica of a rest or a breaker opening at once ([`signals`], which keeps a
//! pub/sub connection of its own beside the one described here).
//!
//! The contract for everything built on it: a call is one round trip (a Lua script through
//! [`Shared::eval`], sent as EVALSHA), bounded by `REDIS_TIMEOUT_MS`, and it either answers or
//! says [`Unavailable`], in which case the caller decides with its own, local state. The handle
//! keeps the mode: `shared` while Redis answers in time, `local` from the first call that did
//! not (or without `REDIS_URL`). In local mode no call goes to Redis at all, so no request pays
//! the timeout twice; a background probe PINGs every second and turns the mode back to shared
//! when Redis answers. Each change of mode is logged once, shown in the
//! `llm_proxy_shared_state_mode` gauge and in `/readyz`'s body (`"limits"`).
//!
//! Every key the proxy writes is named `llm-proxy:{<area>}:...`: the braces are a Redis Cluster
//! hash tag, so the keys one script touches are in one slot; and every key has an expiry.

pub mod activity;
pub mod rests;
pub mod signals;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisError, ScriptInvocation};
use tokio::sync::watch;

use crate::config::{Secret, SharedStateConfig};
pub use crate::ops::metrics::StateMode as Mode;
use crate::ops::metrics::{Metrics, RedisFailure};

/// How often the probe asks Redis whether it answers, in either mode.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Opening a connection (TCP, TLS, AUTH) is the probe's business, never a request's: it may take
/// longer than `REDIS_TIMEOUT_MS`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Redis did not answer in time, is down, or the proxy is in local mode: decide locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("shared state (Redis) unavailable")
    }
}

impl std::error::Error for Unavailable {}

/// The handle to the shared state. Cloning is shallow.
#[derive(Clone)]
pub struct Shared(Arc<Inner>);

struct Inner {
    redis: Option<Redis>,
    fallback_replicas: u32,
    metrics: Metrics,
}

struct Redis {
    client: redis::Client,
    /// The URL with its password masked, for logs.
    display: String,
    /// Masked in any error text that reaches a log line.
    secrets: Vec<Secret>,
    timeout: Duration,
    /// `None` until the probe has connected, and again after a failure, so that the probe
    /// starts from a fresh connection. A synchronous lock: held to clone or replace the handle,
    /// never across an `.await`.
    connection: Mutex<Option<ConnectionManager>>,
    /// `UNKNOWN` until the first probe has run, then `SHARED` or `LOCAL`.
    mode: AtomicU8,
    /// Becomes true once the first probe has run.
    contacted: watch::Sender<bool>,
}

const UNKNOWN: u8 = 0;
const SHARED: u8 = 1;
const LOCAL: u8 = 2;

impl Shared {
    /// Without `REDIS_URL`, a handle that is always local. With it, the probe starts in the
    /// background (so this needs a tokio runtime) and the mode is local until it has answered.
    pub fn new(config: &SharedStateConfig, metrics: Metrics) -> Shared {
        metrics.state_mode(Mode::Local);
        let redis = config.redis.as_ref().and_then(|url| {
            // Cannot fail: `Config` parsed the URL with this very function.
            let client = redis::Client::open(url.url.expose()).ok()?;
            Some(Redis {
                client,
                display: url.display().to_string(),
                secrets: std::iter::once(url.url.clone())
                    .chain(url.password.iter().cloned())
                    .collect(),
                timeout: config.timeout,
                connection: Mutex::new(None),
                mode: AtomicU8::new(UNKNOWN),
                contacted: watch::Sender::new(false),
            })
        });
        let shared = Shared(Arc::new(Inner {
            redis,
            fallback_replicas: config.fallback_replicas,
            metrics,
        }));
        if shared.0.redis.is_some() {
            tokio::spawn(probe_loop(Arc::downgrade(&shared.0)));
        }
        shared
    }

    /// Whether `REDIS_URL` is set.
    pub fn is_configured(&self) -> bool {
        self.0.redis.is_some()
    }

    pub fn mode(&self) -> Mode {
        match &self.0.redis {
            Some(redis) if redis.mode.load(Ordering::Acquire) == SHARED => Mode::Shared,
            _ => Mode::Local,
        }
    }

    /// `REDIS_FALLBACK_REPLICAS`: what a shared limit is divided by while the mode is local.
    pub fn fallback_replicas(&self) -> u32 {
        self.0.fallback_replicas
    }

    /// Resolves once the first probe has run (at most about `CONNECT_TIMEOUT` plus
    /// `REDIS_TIMEOUT_MS` after start-up), so that the start-up log says which mode it is.
    pub async fn first_contact(&self) {
        let Some(redis) = &self.0.redis else {
            return;
        };
        let mut contacted = redis.contacted.subscribe();
        let bound = CONNECT_TIMEOUT + redis.timeout * 2 + Duration::from_millis(100);
        let _ = tokio::time::timeout(bound, contacted.wait_for(|done| *done)).await;
    }

    /// Runs a script (EVALSHA, loading it on `NOSCRIPT`) in one bounded round trip. In local
    /// mode it returns `Unavailable` at once; a timeout or a lost connection turns the mode to
    /// local. An error answer (a bug in a script) is logged and is `Unavailable` too, without
    /// changing the mode.
    ///
    /// `Unavailable` after a timeout means "no answer", not "not applied": the script may still
    /// run once a slow Redis gets to it, so a charge must be safe to have happened twice (once
    /// there, once in the local fallback) or be reconciled.
    pub async fn eval<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let redis = self.0.redis.as_ref().ok_or(Unavailable)?;
        if redis.mode.load(Ordering::Acquire) != SHARED {
            return Err(Unavailable);
        }
        let mut connection = redis.connection.lock().clone().ok_or(Unavailable)?;
        match tokio::time::timeout(redis.timeout, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            // The connection's own response timeout is the same setting and may fire first.
            Ok(Err(err)) if err.is_timeout() => {
                self.0
                    .went_local(RedisFailure::Timeout, &redis.timeout_reason());
                Err(Unavailable)
            }
            Ok(Err(err)) if is_connection_failure(&err) => {
                self.0
                    .went_local(RedisFailure::Connection, &redis.mask(&err));
                Err(Unavailable)
            }
            Ok(Err(err)) => {
                self.0.metrics.redis_failure(RedisFailure::Error);
                log::error!("Redis refused a script: {}", redis.mask(&err));
                Err(Unavailable)
            }
            Err(_) => {
                self.0
                    .went_local(RedisFailure::Timeout, &redis.timeout_reason());
                Err(Unavailable)
            }
        }
    }
}

impl Inner {
    /// Records the mode; logs and updates the gauge only when it changed.
    fn enter(&self, mode: Mode, reason: &str) {
        let Some(redis) = &self.redis else {
            return;
        };
        let code = match mode {
            Mode::Shared => SHARED,
            Mode::Local => LOCAL,
        };
        let before = redis.mode.swap(code, Ordering::AcqRel);
        if before == code {
            return;
        }
        self.metrics.state_mode(mode);
        let url = &redis.display;
        match (before, mode) {
            (UNKNOWN, Mode::Shared) => log::info!(
                "shared state mode: shared: Redis at {url} answers; upstream key rests, \
                 per-client limits and budgets are shared with every replica using it"
            ),
            (_, Mode::Shared) => {
                log::info!("shared state mode: shared: Redis at {url} answers again")
            }
            (UNKNOWN, Mode::Local) => log::warn!(
                "shared state mode: local: Redis at {url} (REDIS_URL) does not answer ({reason}); \
                 this replica keeps its own state and asks again every second"
            ),
            (_, Mode::Local) => log::warn!(
                "shared state mode: local: Redis at {url} stopped answering ({reason}); this \
                 replica keeps its own state until Redis answers again"
            ),
        }
    }

    fn went_local(&self, failure: RedisFailure, reason: &str) {
        self.metrics.redis_failure(failure);
        if let Some(redis) = &self.redis {
            // The probe starts again from a new connection.
            *redis.connection.lock() = None;
        }
        self.enter(Mode::Local, reason);
    }

    /// One probe: connect if there is no connection, then PING, each bounded.
    async fn probe(&self) {
        let Some(redis) = &self.redis else {
            return;
        };
        match redis.ping().await {
            Ok(()) => self.enter(Mode::Shared, ""),
            Err((failure, reason)) => self.went_local(failure, &reason),
        }
        redis.contacted.send_replace(true);
    }
}

impl Redis {
    async fn ping(&self) -> Result<(), (RedisFailure, String)> {
        let existing = self.connection.lock().clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(self.timeout))
                    // Reconnecting after a dropped connection is the manager's; giving up on
                    // Redis and coming back is the probe's.
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let connect = ConnectionManager::new_with_config(self.client.clone(), config);
                match tokio::time::timeout(CONNECT_TIMEOUT + self.timeout, connect).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(err)) => return Err((RedisFailure::Connection, self.mask(&err))),
                    Err(_) => {
                        return Err((
                            RedisFailure::Timeout,
                            format!("no connection within {} ms", CONNECT_TIMEOUT.as_millis()),
                        ));
                    }
                }
            }
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut connection)).await
        {
            Ok(Ok(_)) => {
                *self.connection.lock() = Some(connection);
                Ok(())
            }
            Ok(Err(err)) if err.is_timeout() => Err((RedisFailure::Timeout, self.timeout_reason())),
            Ok(Err(err)) if is_connection_failure(&err) => {
                Err((RedisFailure::Connection, self.mask(&err)))
            }
            Ok(Err(err)) => Err((RedisFailure::Error, self.mask(&err))),
            Err(_) => Err((RedisFailure::Timeout, self.timeout_reason())),
        }
    }

    fn timeout_reason(&self) -> String {
        format!(
            "no answer within {} ms, REDIS_TIMEOUT_MS",
            self.timeout.as_millis()
        )
    }

    /// An error's text with the URL and password masked (a connection error may quote them).
    fn mask(&self, err: &RedisError) -> String {
        let mut text = err.to_string();
        for secret in &self.secrets {
            if !secret.expose().is_empty() {
                text = text.replace(secret.expose(), "***");
            }
        }
        text
    }
}

fn is_connection_failure(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
}

/// Probes every `PROBE_INTERVAL` until the handle is dropped.
async fn probe_loop(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.probe().await;
        drop(strong);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
