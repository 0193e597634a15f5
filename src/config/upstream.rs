//! Where requests go and with which keys: the base URL, the key pool, the query added to every
//! request, and the settings the upstream connection pools are built from. The pools themselves
//! are the upstream code's (`proxy::clients`); what can be wrong about them is checked here, so
//! that start-up fails naming the variable.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use warp::http::{HeaderName, HeaderValue};

use super::Secret;
use super::env::Settings;
use super::error::{ConfigError, invalid};
use super::values::{self, IN_THE_ENVIRONMENT, UpstreamQuery};

/// `UPSTREAM_HTTP2_CONNECTIONS` at most: each pool loads its own TLS roots.
const MAX_UPSTREAM_CONNECTIONS: u64 = 64;

/// The variables reqwest reads an outbound proxy from, in both cases.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// Equal when every setting and every key (by value) is: a reload keeps what was built from an
/// upstream whose configuration did not change.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// What the caller's `/v1` is replaced by, without a trailing slash: `TARGET_HOST` + `/v1`,
    /// or `TARGET_BASE_URL` as it is (the meaning the OpenAI SDKs give `base_url`).
    pub base_url: Url,
    /// `AUTH_BEARER`: one key, or a pool of keys used in turn, in the order given.
    pub keys: Vec<UpstreamKey>,
    /// `UPSTREAM_AUTH_HEADER`: the header the key goes in.
    pub auth_header: HeaderName,
    /// `UPSTREAM_QUERY`: parameters added to every upstream request.
    pub query: Option<UpstreamQuery>,
    pub connection: ConnectionSettings,
}

/// Everything the upstream connection pools are built from. Two equal settings give pools that
/// behave alike, so pools built for one serve the other.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// `UPSTREAM_CA_FILE`, read and checked.
    pub ca_file: Option<CaFile>,
    /// `UPSTREAM_CONNECT_TIMEOUT_SECS`.
    pub connect_timeout: Duration,
    /// `UPSTREAM_HTTP2_CONNECTIONS`: how many pools requests take in turn, 1 to 64.
    pub pools: usize,
    /// Whether the process environment names an outbound proxy (where reqwest looks for one,
    /// not the `.env` files).
    pub outbound_proxy: bool,
    /// Whether the base URL is `http://`: such a connection is HTTP/1.1 (HTTP/2 is only ever
    /// negotiated through TLS here), which decides what the pools need to be ready for.
    pub cleartext: bool,
}

/// The configuration's log line shows the settings one sets; `cleartext` is the base URL's,
/// which the line shows already.
impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("pools", &self.pools)
            .field("outbound_proxy", &self.outbound_proxy)
            .finish()
    }
}

/// The certificates of `UPSTREAM_CA_FILE` as they were read: at least one, each one rustls
/// accepts as a trust anchor.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CaFile").field(&self.path).finish()
    }
}

/// One upstream key and the header value it is sent as.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    pub key: Secret,
    /// `Bearer <key>` for `Authorization`, else the bare key; marked sensitive so hyper never
    /// logs or indexes it.
    pub header_value: HeaderValue,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url.as_str())
            .field("keys", &self.keys.len())
            .field("auth_header", &self.auth_header)
            .field("query", &self.query)
            .field("connection", &self.connection)
            .finish()
    }
}

impl UpstreamConfig {
    pub(super) fn parse<F: Fn(&str) -> Option<String>>(
        settings: &Settings<F>,
        connect_timeout: Duration,
    ) -> Result<UpstreamConfig, ConfigError> {
        let auth_header = values::header_name(
            "UPSTREAM_AUTH_HEADER",
            &settings.value("UPSTREAM_AUTH_HEADER").unwrap_or_default(),
        )?;
        let base_url = base_url(settings)?;
        let bearer = settings.set("AUTH_BEARER").ok_or_else(|| {
            invalid(
                "AUTH_BEARER",
                "is required: set it to the upstream API key, or several keys separated by commas",
            )
        })?;
        Ok(UpstreamConfig {
            keys: comma_separated_keys("AUTH_BEARER", &bearer, &auth_header)?,
            auth_header,
            query: values::upstream_query("UPSTREAM_QUERY", settings.set("UPSTREAM_QUERY"))?,
            connection: ConnectionSettings {
                ca_file: settings
                    .set("UPSTREAM_CA_FILE")
                    .map(|path| ca_file("UPSTREAM_CA_FILE", &path))
                    .transpose()?,
                connect_timeout,
                pools: pools(
                    "UPSTREAM_HTTP2_CONNECTIONS",
                    values::positive(
                        "UPSTREAM_HTTP2_CONNECTIONS",
                        settings.value("UPSTREAM_HTTP2_CONNECTIONS"),
                    )?,
                )?,
                outbound_proxy: outbound_proxy_set(),
                cleartext: base_url.scheme() == "http",
            },
            base_url,
        })
    }
}

/// Whether the process environment names an outbound proxy (which is where reqwest looks, not the
/// `.env` files).
pub(super) fn outbound_proxy_set() -> bool {
    outbound_proxy(|name| std::env::var_os(name).is_some())
}

fn outbound_proxy(is_set: impl Fn(&str) -> bool) -> bool {
    PROXY_VARIABLES.iter().any(|name| is_set(name))
}

fn base_url<F: Fn(&str) -> Option<String>>(settings: &Settings<F>) -> Result<Url, ConfigError> {
    match (settings.set("TARGET_HOST"), settings.set("TARGET_BASE_URL")) {
        (Some(_), Some(_)) => Err(invalid(
            "TARGET_BASE_URL",
            "cannot be set together with TARGET_HOST: set TARGET_BASE_URL to the base URL \
             your provider documents (the client's /v1/<rest> goes to \
             TARGET_BASE_URL/<rest>), or TARGET_HOST to a host whose API is under /v1",
        )),
        (None, Some(base)) => values::upstream_base(
            "TARGET_BASE_URL",
            &base,
            "https://api.openai.com/v1 or https://open.bigmodel.cn/api/paas/v4",
            &IN_THE_ENVIRONMENT,
        ),
        (_, None) => {
            let host = settings.value("TARGET_HOST").unwrap_or_default();
            let mut url = values::upstream_base(
                "TARGET_HOST",
                &host,
                "https://api.openai.com or https://host/openai",
                &IN_THE_ENVIRONMENT,
            )?;
            let path = format!("{}/v1", url.path().trim_end_matches('/'));
            url.set_path(&path);
            Ok(url)
        }
    }
}

/// `UPSTREAM_HTTP2_CONNECTIONS` or an upstream's `http2_connections` (`variable`), already at
/// least 1: at most 64.
pub(super) fn pools(variable: &str, pools: u64) -> Result<usize, ConfigError> {
    if pools > MAX_UPSTREAM_CONNECTIONS {
        return Err(invalid(
            variable,
            format!("is more than {MAX_UPSTREAM_CONNECTIONS}"),
        ));
    }
    Ok(pools as usize)
}

/// `UPSTREAM_CA_FILE` or an upstream's `ca_file` (`variable`): the PEM certificates in the file,
/// at least one, each accepted by rustls.
pub(super) fn ca_file(variable: &str, path: &str) -> Result<CaFile, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|err| invalid(variable, format!("{path:?} cannot be read: {err}")))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
        invalid(
            variable,
            format!("{path:?} is not a PEM certificate file: {err}"),
        )
    })?;
    if certificates.is_empty() {
        return Err(invalid(
            variable,
            format!("{path:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    // rustls takes a certificate as a trust anchor only when a client is built. One without the
    // compiled-in and system roots costs next to nothing, and leaves nothing the real pools could
    // still fail on because of this file.
    let mut check = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false);
    for certificate in certificates {
        check = check.add_root_certificate(certificate);
    }
    check.build().map_err(|err| {
        invalid(
            variable,
            format!("no HTTP client can be built for the upstream: {err}"),
        )
    })?;
    Ok(CaFile {
        path: PathBuf::from(path),
        pem: Arc::from(pem),
    })
}

/// `AUTH_BEARER` or the variable an upstream's `keys_env` names (`variable`): keys separated by
/// commas, trimmed, at least one.
pub(super) fn comma_separated_keys(
    variable: &str,
    value: &str,
    header: &HeaderName,
) -> Result<Vec<UpstreamKey>, ConfigError> {
    let keys: Vec<&str> = value.split(',').map(str::trim).collect();
    if let Some(index) = keys.iter().position(|key| key.is_empty()) {
        return Err(invalid(
            variable,
            format!("key {} is empty: separate keys by single commas", index + 1),
        ));
    }
    upstream_keys(variable, &keys, header)
}

/// Keys as they are sent in `header`, each checked to be sendable there.
pub(super) fn upstream_keys(
    variable: &str,
    keys: &[&str],
    header: &HeaderName,
) -> Result<Vec<UpstreamKey>, ConfigError> {
    let bearer = header == warp::http::header::AUTHORIZATION;
    let mut pool = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let position = index + 1;
        let text = if bearer {
            format!("Bearer {key}")
        } else {
            key.to_string()
        };
        // The key is not echoed, only its position.
        let mut header_value = HeaderValue::from_str(&text).map_err(|_| {
            invalid(
                variable,
                format!("key {position} contains characters that cannot be sent in an HTTP header"),
            )
        })?;
        header_value.set_sensitive(true);
        pool.push(UpstreamKey {
            key: Secret::new(*key),
            header_value,
        });
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_proxy_variable_in_either_case_counts() {
        assert!(!outbound_proxy(|_| false));
        for name in ["HTTPS_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            assert!(outbound_proxy(|seen| seen == name), "{name}");
        }
        assert!(!outbound_proxy(|seen| seen == "NO_PROXY"));
    }
}
