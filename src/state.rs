//! Shared application state, injected into filters.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use warp::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::auth::{TokenSet, token_label};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::models_cache::ModelsCache;

/// How long `/v1/models` answers are kept.
pub const MODELS_CACHE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Cloning is shallow: every clone shares one configuration, connection pool and cache.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    /// `TARGET_HOST`, parsed once; each request only sets path and query on a copy.
    pub target_url: reqwest::Url,
    pub metrics: Metrics,
    /// The `client` label of each `ALLOWED_TOKENS` entry, in the same order.
    pub client_labels: Vec<Arc<str>>,
    /// Set once shutdown has begun: `/readyz` then answers 503.
    pub draining: AtomicBool,
    pub client: reqwest::Client,
    pub models: ModelsCache,
    pub client_tokens: TokenSet,
    /// `None` when `ADMIN_TOKEN` is unset: the admin routes then do not exist.
    pub admin_tokens: Option<TokenSet>,
    /// `METRICS_TOKEN`, else `ADMIN_TOKEN`; `None`: `/metrics` is open.
    pub metrics_tokens: Option<TokenSet>,
    /// `Bearer <AUTH_BEARER>`, built once and marked sensitive so hyper never logs or indexes it.
    pub upstream_authorization: HeaderValue,
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config) -> Result<AppState, String> {
        let client = reqwest::Client::builder()
            // A followed redirect would send the upstream key wherever `Location` points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.limits.upstream_connect_timeout)
            .tcp_nodelay(true)
            // Enough warm connections for a burst; without a cap every connection of a peak (one
            // per concurrent stream) would stay open, buffers and all, for the idle timeout.
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| format!("cannot build the HTTP client: {err}"))?;
        let mut upstream_authorization =
            HeaderValue::from_str(&format!("Bearer {}", config.auth_bearer.expose()))
                .map_err(|_| "AUTH_BEARER: not a valid header value".to_string())?;
        upstream_authorization.set_sensitive(true);
        let client_labels = config
            .allowed_tokens
            .iter()
            .map(|client| match &client.name {
                Some(name) => Arc::from(name.as_str()),
                None => Arc::from(token_label(&client.token)),
            })
            .collect();
        let target_url = reqwest::Url::parse(&config.target_host)
            .map_err(|_| "TARGET_HOST: not a valid URL".to_string())?;
        Ok(AppState(Arc::new(Inner {
            target_url,
            client_tokens: TokenSet::new(config.allowed_tokens.iter().map(|client| &client.token)),
            client_labels,
            metrics: Metrics::new(),
            draining: AtomicBool::new(false),
            admin_tokens: config
                .admin_token
                .as_ref()
                .map(std::iter::once)
                .map(TokenSet::new),
            metrics_tokens: config
                .metrics_token
                .as_ref()
                .or(config.admin_token.as_ref())
                .map(std::iter::once)
                .map(TokenSet::new),
            models: ModelsCache::new(MODELS_CACHE_TTL),
            upstream_authorization,
            client,
            config,
        })))
    }
}

impl AppState {
    /// The upstream key as it is searched for in upstream responses. A key under 8 bytes (only
    /// ever a test value) is not searched for: it would match ordinary text such as request ids.
    pub fn key_to_mask(&self) -> &[u8] {
        let key = self.config.auth_bearer.expose().as_bytes();
        if key.len() >= 8 { key } else { b"" }
    }

    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Replaces every configured secret found in `text` by `***`, for debug logs of bodies.
    pub fn mask(&self, text: &str) -> String {
        let config = &self.config;
        let secrets = std::iter::once(&config.auth_bearer)
            .chain(config.allowed_tokens.iter().map(|client| &client.token))
            .chain(&config.admin_token)
            .chain(&config.metrics_token);
        let mut masked = text.to_string();
        for secret in secrets {
            if masked.contains(secret.expose()) {
                masked = masked.replace(secret.expose(), "***");
            }
        }
        masked
    }

    /// Headers as `name: value` pairs for debug logs, credentials shown as `***`.
    pub fn describe_headers(&self, headers: &HeaderMap) -> String {
        let credential_headers = [
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
            header::SET_COOKIE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("api-key"),
        ];
        headers
            .iter()
            .map(|(name, value)| {
                if credential_headers.contains(name) || name == self.config.auth_header {
                    format!("{name}: ***")
                } else {
                    format!(
                        "{name}: {}",
                        self.mask(&String::from_utf8_lossy(value.as_bytes()))
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
