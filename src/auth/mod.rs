//! Who may call what: the token sets, the caller a request is from, the warp filters that check
//! them after a route's path has matched, and every kind of redaction.

pub mod filters;
pub mod redact;
mod tokens;

use std::sync::Arc;

use warp::http::{HeaderMap, HeaderName, Method, header};

use crate::config::Config;
use crate::error::ProxyError;
use crate::proxy::upgrade::{is_websocket_upgrade, subprotocol_token};
pub use tokens::{TokenSet, presented_token, token_label};

/// The label of callers when `AUTH_VALIDATION` is off: any token goes, so none can be a label.
pub const ANONYMOUS: &str = "anonymous";

/// Who is calling: the label used in metrics and the access log, never the token itself.
#[derive(Clone, Debug)]
pub struct Caller {
    pub label: Arc<str>,
}

/// The token checks, built once from the configuration. Cloning is shallow.
#[derive(Clone)]
pub struct Authenticator(Arc<Inner>);

struct Inner {
    validation: bool,
    /// Where callers and the admin put their token (`DEFAULT_AUTH_HEADER`).
    header: HeaderName,
    clients: TokenSet,
    /// `None` when `ADMIN_TOKEN` is unset: the admin routes then do not exist.
    admin: Option<TokenSet>,
    /// `METRICS_TOKEN`, else `ADMIN_TOKEN`; `None`: `/metrics` is open.
    scrapers: Option<TokenSet>,
    anonymous: Arc<str>,
}

impl Authenticator {
    pub fn new(config: &Config) -> Authenticator {
        Authenticator(Arc::new(Inner {
            validation: config.auth_validation,
            header: config.auth_header.clone(),
            clients: config.client_tokens.clone(),
            admin: config
                .admin_token
                .as_ref()
                .map(|token| TokenSet::single("admin", token)),
            scrapers: config
                .metrics_token
                .as_ref()
                .or(config.admin_token.as_ref())
                .map(|token| TokenSet::single("metrics", token)),
            anonymous: Arc::from(ANONYMOUS),
        }))
    }

    /// The header callers put their token in; it is never forwarded upstream.
    pub fn token_header(&self) -> &HeaderName {
        &self.0.header
    }

    /// Anyone when `AUTH_VALIDATION` is off, otherwise only a caller with a token from
    /// `ALLOWED_TOKENS`.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        if !self.0.validation {
            return Ok(Caller {
                label: self.0.anonymous.clone(),
            });
        }
        let found = self
            .presented_in(&self.0.header, headers, &self.0.clients)
            .or_else(|| self.presented_as_subprotocol(headers));
        match found {
            Some(label) => Ok(Caller {
                label: label.clone(),
            }),
            None => Err(self.refuse()),
        }
    }

    pub fn admin_enabled(&self) -> bool {
        self.0.admin.is_some()
    }

    /// `ADMIN_TOKEN`, whatever `AUTH_VALIDATION` says: a client token is not enough.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.0.admin {
            Some(tokens) if self.presented_in(&self.0.header, headers, tokens).is_some() => Ok(()),
            _ => Err(self.refuse()),
        }
    }

    /// `/metrics` takes its token in `Authorization` (Bearer or bare, as Prometheus'
    /// `authorization` setting sends it) whatever `DEFAULT_AUTH_HEADER` says.
    pub fn check_scraper(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.0.scrapers {
            None => Ok(()),
            Some(tokens)
                if self
                    .presented_in(&header::AUTHORIZATION, headers, tokens)
                    .is_some() =>
            {
                Ok(())
            }
            Some(_) => Err(self.refuse()),
        }
    }

    fn presented_in<'a>(
        &self,
        name: &HeaderName,
        headers: &HeaderMap,
        tokens: &'a TokenSet,
    ) -> Option<&'a Arc<str>> {
        tokens.find(presented_token(headers.get(name)?))
    }

    /// A browser's WebSocket cannot carry headers, so its token may come as a subprotocol.
    fn presented_as_subprotocol(&self, headers: &HeaderMap) -> Option<&Arc<str>> {
        if !is_websocket_upgrade(&Method::GET, headers) {
            return None;
        }
        self.0.clients.find(subprotocol_token(headers)?)
    }

    fn refuse(&self) -> ProxyError {
        // Never the token itself: only which header was looked at.
        log::debug!(
            "rejected a request without a valid token in {}",
            self.0.header
        );
        ProxyError::Unauthorized
    }
}
