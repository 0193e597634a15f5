//! Where the parts are put together: the token checks, the upstream handle, the models cache and
//! the metrics, each handed on by itself to the code that needs it.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::auth::Authenticator;
use crate::auth::redact::Redactor;
use crate::config::{Config, ConfigError};
use crate::ops::metrics::Metrics;
use crate::policy::{Ledger, Limiter, MemoryLimiter, Policy, RedisLimiter, redis};
use crate::proxy::router::Router;
use crate::reload::{Reloadable, report_budgets};
use crate::shared::Shared;
use crate::shared::activity::SharedActivity;
use crate::shared::signals::Signals;

pub use crate::proxy::MODELS_CACHE_TTL;

/// Cloning is shallow: every clone shares one configuration, connection pool and cache.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub auth: Authenticator,
    /// The upstreams and the routing between them; each upstream caches its own model list.
    pub router: Router,
    pub metrics: Metrics,
    pub policy: Policy,
    /// Debug-log masking; told about new secrets on reload.
    pub redactor: Arc<Redactor>,
    /// The state shared by replicas (Redis), and its mode.
    pub shared: Shared,
    /// Key rests and breaker openings told to and heard from the other replicas (Redis).
    pub signals: Signals,
    /// The last hour minute by minute, for the status page: this replica's ring and its Redis side.
    pub activity: SharedActivity,
    /// Set once shutdown has begun: `/readyz` then answers 503.
    draining: AtomicBool,
    /// Whether the daily budgets are written to `STATE_DIR` (set by `main` once the store opened).
    budgets_kept: Arc<AtomicBool>,
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The Redis limiter with `REDIS_URL` set, the in-process one otherwise.
pub fn default_limiter(shared: &Shared) -> Arc<dyn Limiter> {
    if shared.is_configured() {
        Arc::new(RedisLimiter::new(shared.clone(), redis::slot_ttl()))
    } else {
        Arc::new(MemoryLimiter::new())
    }
}

impl AppState {
    /// With `REDIS_URL` set it starts the Redis probe, so it needs a tokio runtime.
    ///
    /// # Panics
    ///
    /// When the upstream connection pools cannot be built, which `Config` rules out except
    /// for a machine certificate store without one usable certificate. `main` builds through
    /// [`AppState::with_limiter`], which reports that as a configuration error instead.
    pub fn new(config: Config) -> AppState {
        AppState::with_limiter(config, |shared| default_limiter(shared))
            .unwrap_or_else(|err| panic!("configuration error: {err}"))
    }

    /// With the limiter backend `make` builds from the shared-state handle (the in-process one
    /// holds restored budgets at start-up). Fails only when the upstream connection pools cannot
    /// be built.
    pub fn with_limiter(
        config: Config,
        make: impl FnOnce(&Shared) -> Arc<dyn Limiter>,
    ) -> Result<AppState, ConfigError> {
        let metrics = Metrics::new();
        report_budgets(&metrics, &config.clients);
        let redactor = Arc::new(Redactor::new(&config));
        let shared = Shared::new(&config.shared, metrics.clone());
        let signals = Signals::new(&shared);
        let activity = SharedActivity::new(&shared, metrics.activity().clone());
        let limiter = make(&shared);
        let ledger = Ledger::new(shared.clone());
        Ok(AppState(Arc::new(Inner {
            auth: Authenticator::new(&config),
            router: Router::new(
                &config,
                metrics.clone(),
                redactor.clone(),
                &shared,
                &signals,
            )?,
            shared,
            signals,
            activity,
            policy: Policy::new(&config, limiter, ledger, metrics.clone()),
            redactor,
            metrics,
            draining: AtomicBool::new(false),
            budgets_kept: Arc::new(AtomicBool::new(false)),
            config,
        })))
    }

    /// What a reload replaces or reports to, and the configuration it started from.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            config: self.config.clone(),
            auth: self.auth.clone(),
            redactor: self.redactor.clone(),
            metrics: self.metrics.clone(),
            budgets_kept: self.budgets_kept.clone(),
            router: self.router.clone(),
            shared: self.shared.clone(),
        }
    }

    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn keep_budgets(&self) {
        self.budgets_kept.store(true, Ordering::Relaxed);
    }

    pub fn budgets_kept(&self) -> bool {
        self.budgets_kept.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
