//! Who may call what: the token sets, the caller a request is from, the checks the route handlers
//! make after a request's route is known (so that unknown paths stay 404s), and every kind of
//! redaction.

pub mod redact;
mod tokens;

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use warp::http::{HeaderMap, HeaderName, Method, header};

use crate::config::{Client, Config};
use crate::error::ProxyError;
use crate::vocab::websocket::{is_websocket_upgrade, subprotocol_token};
pub use tokens::{TokenSet, digest, presented_token, token_label};

/// The label of callers when `AUTH_VALIDATION` is off: any token goes, so none can be a label.
pub const ANONYMOUS: &str = "anonymous";

/// Who is calling: the label used in metrics and the access log, never the token itself.
#[derive(Clone, Debug)]
pub struct Caller {
    pub label: Arc<str>,
    /// The client and its limits as they were when the request arrived: a reload during the
    /// request does not change them. `None` when `AUTH_VALIDATION` is off.
    pub client: Option<Arc<Client>>,
}

/// The token checks. The rules they apply can be replaced at run time ([`Authenticator::replace`]);
/// each check reads one snapshot. Cloning is shallow.
#[derive(Clone)]
pub struct Authenticator(Arc<Inner>);

struct Inner {
    /// Where callers and the admin put their token (`DEFAULT_AUTH_HEADER`); a restart setting.
    header: HeaderName,
    rules: ArcSwap<Rules>,
    anonymous: Arc<str>,
}

/// What a reload can change: who may call, with which limits, and the operator tokens.
struct Rules {
    validation: bool,
    clients: TokenSet<Arc<Client>>,
    /// The same clients, in configuration order, for `/admin/clients`.
    listed: Vec<Arc<Client>>,
    /// `None` when `ADMIN_TOKEN` is unset: the admin routes then do not exist.
    admin: Option<TokenSet>,
    /// `METRICS_TOKEN`, else `ADMIN_TOKEN`; `None`: `/metrics` is open.
    scrapers: Option<TokenSet>,
}

impl Rules {
    fn new(config: &Config) -> Rules {
        let listed: Vec<Arc<Client>> = config.clients.iter().cloned().map(Arc::new).collect();
        Rules {
            validation: config.auth_validation,
            clients: TokenSet::from_digests(
                listed.iter().map(|client| (client.digest, client.clone())),
            ),
            listed,
            admin: config
                .admin_token
                .as_ref()
                .map(|token| TokenSet::single("admin", token)),
            scrapers: config
                .metrics_token
                .as_ref()
                .or(config.admin_token.as_ref())
                .map(|token| TokenSet::single("metrics", token)),
        }
    }
}

impl Authenticator {
    pub fn new(config: &Config) -> Authenticator {
        Authenticator(Arc::new(Inner {
            header: config.auth_header.clone(),
            rules: ArcSwap::from_pointee(Rules::new(config)),
            anonymous: Arc::from(ANONYMOUS),
        }))
    }

    /// Puts the clients and tokens of a newly loaded configuration in place, all at once:
    /// requests already past their check keep the client they were given.
    pub fn replace(&self, config: &Config) {
        self.0.rules.store(Arc::new(Rules::new(config)));
    }

    /// Every configured client, in configuration order.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        self.0.rules.load().listed.clone()
    }

    /// Anyone when `AUTH_VALIDATION` is off, otherwise only a caller with the token of a client
    /// that is neither disabled nor expired. An inactive client gets the same answer as an
    /// unknown token.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        let rules = self.0.rules.load();
        if !rules.validation {
            return Ok(Caller {
                label: self.0.anonymous.clone(),
                client: None,
            });
        }
        let found = self
            .presented_in(&self.0.header, headers, &rules.clients)
            .or_else(|| presented_as_subprotocol(headers, &rules.clients));
        match found {
            Some(client) if client.limits.is_active(SystemTime::now()) => Ok(Caller {
                label: client.name.clone(),
                client: Some(client.clone()),
            }),
            _ => Err(self.refuse()),
        }
    }

    pub fn admin_enabled(&self) -> bool {
        self.0.rules.load().admin.is_some()
    }

    /// `ADMIN_TOKEN`, whatever `AUTH_VALIDATION` says: a client token is not enough.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.0.rules.load().admin {
            Some(tokens) if self.presented_in(&self.0.header, headers, tokens).is_some() => Ok(()),
            _ => Err(self.refuse()),
        }
    }

    /// `/metrics` takes its token in `Authorization` (Bearer or bare, as Prometheus'
    /// `authorization` setting sends it) whatever `DEFAULT_AUTH_HEADER` says.
    pub fn check_scraper(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        match &self.0.rules.load().scrapers {
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

    fn presented_in<'a, T>(
        &self,
        name: &HeaderName,
        headers: &HeaderMap,
        tokens: &'a TokenSet<T>,
    ) -> Option<&'a T> {
        tokens.find(presented_token(headers.get(name)?))
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

/// A browser's WebSocket cannot carry headers, so its token may come as a subprotocol.
fn presented_as_subprotocol<'a, T>(headers: &HeaderMap, tokens: &'a TokenSet<T>) -> Option<&'a T> {
    if !is_websocket_upgrade(&Method::GET, headers) {
        return None;
    }
    tokens.find(subprotocol_token(headers)?)
}
