//! HTTPS for the mock, as real providers serve: a certificate made at start-up and a rustls
//! server offering `h2` and `http/1.1` by ALPN, in front of the same warp filter as plain mode.
//!
//! warp's own server speaks plain TCP only (its TLS acceptor is not public), so this module has
//! its own accept loop: TLS handshake, then hyper-util's auto builder over `warp::service`, which
//! serves HTTP/2 or HTTP/1.1 as the client's preface says (the ALPN choice).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use warp::Filter;
use warp::reject::Rejection;
use warp::reply::Reply;

/// A client that connects and never finishes its handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A self-signed certificate for `127.0.0.1`, `::1` and `localhost`, and the server
/// configuration that presents it. Cloning is shallow.
#[derive(Clone)]
pub struct SelfSigned {
    cert_pem: String,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned").finish_non_exhaustive()
    }
}

impl SelfSigned {
    /// A fresh key pair and certificate. The certificate is its own issuer, so trusting its PEM
    /// (the proxy's `UPSTREAM_CA_FILE`) is all a client needs.
    pub fn generate() -> Result<SelfSigned, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let names = ["127.0.0.1", "::1", "localhost"].map(String::from).to_vec();
        let cert = rcgen::CertificateParams::new(names)
            .and_then(|params| params.self_signed(&key))
            .map_err(|e| e.to_string())?;
        // The ring provider by name: with two providers in a build, the process-wide default
        // would be ambiguous.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| {
                builder.with_no_client_auth().with_single_cert(
                    vec![CertificateDer::from(cert.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
            })
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(SelfSigned {
            cert_pem: cert.pem(),
            config: Arc::new(config),
        })
    }

    /// The certificate in PEM, what a client adds to its trusted roots.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

/// Serves `filter` over TLS on `listener` until `stop` resolves, then waits for the open
/// connections to finish (the caller bounds that wait).
///
/// `max_streams` is the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` a connection advertises; `None`
/// advertises none, so a client may open as many streams on one connection as it likes (hyper's
/// own default would be 200).
pub(crate) async fn serve<F>(
    listener: TcpListener,
    identity: SelfSigned,
    max_streams: Option<u32>,
    filter: F,
    stop: impl Future<Output = ()>,
) where
    F: Filter<Error = Rejection> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let acceptor = TlsAcceptor::from(identity.config);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(max_streams);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // Out of descriptors and the like: wait a little rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let service = TowerToHyperService::new(warp::service(filter.clone()));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            // A client that goes away mid-response is the client's business.
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
