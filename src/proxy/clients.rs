//! The upstream connection pools, built once at start-up from the configuration's
//! [`ConnectionSettings`] and held by the [`super::Upstream`] handle. A reload never rebuilds
//! them: warm connections and TLS sessions outlive any change of clients or tokens, and a change
//! of their own settings is logged as taking effect after a restart.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::{ConfigError, ConnectionSettings};

/// The pools requests take in turn, and the HTTP/1.1 client for WebSocket tunnels.
pub struct UpstreamClients {
    /// One HTTP/2 connection each to an upstream that offers it. Never empty.
    pub pools: Vec<reqwest::Client>,
    /// HTTP/1.1 only: a WebSocket upgrade cannot ride on an HTTP/2 connection that ALPN may
    /// pick for the pools above.
    pub tunnel: TunnelClient,
}

/// The HTTP/1.1 client for WebSocket tunnels, built at the first upgrade. Every client reads
/// the machine's certificate store again and keeps its own copy of it (some 90 KiB of heap, and
/// milliseconds of start-up), which a proxy that never opens a tunnel would carry for nothing.
/// The pools, built at start-up from the same settings, have already shown that it can be built.
/// Cloning is shallow: an upstream rebuilt on reload shares it with the one it replaces.
#[derive(Clone)]
pub struct TunnelClient(Arc<Tunnel>);

struct Tunnel {
    settings: ConnectionSettings,
    client: OnceLock<reqwest::Client>,
}

impl TunnelClient {
    fn new(settings: &ConnectionSettings) -> TunnelClient {
        TunnelClient(Arc::new(Tunnel {
            settings: settings.clone(),
            client: OnceLock::new(),
        }))
    }

    /// The client, built now if no upgrade has needed it yet. Two first upgrades at once may
    /// both build one; the first stored is kept.
    pub fn get(&self) -> Result<&reqwest::Client, ConfigError> {
        if let Some(client) = self.0.client.get() {
            return Ok(client);
        }
        let client = http_client(&self.0.settings, Protocols::Http1Only)?;
        Ok(self.0.client.get_or_init(|| client))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocols {
    Negotiated,
    Http1Only,
}

impl UpstreamClients {
    /// The configuration checked what it could (the CA file is read and accepted by rustls), so
    /// what is left to fail is the machine's own certificate store; the error names the variable
    /// all the same.
    pub fn build(settings: &ConnectionSettings) -> Result<UpstreamClients, ConfigError> {
        // One pool each: hyper's client puts every request to a host on its one HTTP/2
        // connection, and queues those beyond the provider's stream limit rather than opening
        // another.
        let pools = (0..settings.pools.max(1))
            .map(|_| http_client(settings, Protocols::Negotiated))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UpstreamClients {
            pools,
            tunnel: TunnelClient::new(settings),
        })
    }
}

fn http_client(
    settings: &ConnectionSettings,
    protocols: Protocols,
) -> Result<reqwest::Client, ConfigError> {
    let variable = if settings.ca_file.is_some() {
        "UPSTREAM_CA_FILE"
    } else {
        "TARGET_HOST"
    };
    let failed = |err: reqwest::Error| ConfigError {
        variable: variable.to_string(),
        message: format!("no HTTP client can be built for the upstream: {err}"),
    };
    let mut builder = reqwest::Client::builder();
    // Without a proxy variable, reqwest would still run its system-proxy matcher on every
    // request (twice); with one, it reads them as before.
    if !settings.outbound_proxy {
        builder = builder.no_proxy();
    }
    if protocols == Protocols::Http1Only {
        builder = builder.http1_only();
    }
    // reqwest sends again, on a new connection, a request that an HTTP/2 connection refused
    // unprocessed (GOAWAY, REFUSED_STREAM), and for that copies every request whose body it
    // could send twice (its headers, URL and body) before sending it. Over HTTP/1.1 that never
    // happens, and the copy is all that is left: a body read whole (for routing, limits or a
    // key pool's retries) would pay for it on every request.
    if settings.cleartext || protocols == Protocols::Http1Only {
        builder = builder.retry(reqwest::retry::never().max_retries_per_request(0));
    }
    // Trusted: the compiled-in Mozilla roots, the machine's store where it has one (read by
    // rustls-native-certs, which honours SSL_CERT_FILE and SSL_CERT_DIR), and UPSTREAM_CA_FILE.
    if let Some(ca_file) = &settings.ca_file {
        for certificate in reqwest::Certificate::from_pem_bundle(&ca_file.pem).map_err(failed)? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        // A followed redirect would send the upstream key wherever `Location` points.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        // Enough warm connections for a burst; without a cap every connection of a peak (one
        // per concurrent stream) would stay open, buffers and all, for the idle timeout.
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pools: usize) -> ConnectionSettings {
        ConnectionSettings {
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            pools,
            outbound_proxy: false,
            cleartext: false,
        }
    }

    #[test]
    fn the_configuration_line_shows_only_the_connection_settings_one_sets() {
        let cleartext = ConnectionSettings {
            cleartext: true,
            ..settings(2)
        };
        assert_eq!(
            format!("{cleartext:?}"),
            "ConnectionSettings { ca_file: None, connect_timeout: 10s, pools: 2, \
             outbound_proxy: false }"
        );
    }

    #[test]
    fn one_pool_per_http2_connection_asked_for() {
        assert_eq!(UpstreamClients::build(&settings(3)).unwrap().pools.len(), 3);
        assert_eq!(UpstreamClients::build(&settings(1)).unwrap().pools.len(), 1);
    }
}
