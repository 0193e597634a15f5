//! An upstream behind a private CA: trusted with `UPSTREAM_CA_FILE`, refused without it, and
//! reached over HTTP/2 when it offers h2 by ALPN (HTTP/1.1 when it does not). The CA and the
//! server certificate are made for each test run.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::helpers::*;

/// What the TLS upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    version: Version,
    path: String,
    authorization: Option<String>,
    body: Bytes,
}

struct TlsUpstream {
    addr: SocketAddr,
    ca_file: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

/// A TLS server on 127.0.0.1 with a certificate from a fresh CA (written to a PEM file), offering
/// `alpn` and answering every request with a small JSON body.
async fn tls_upstream(alpn: &[&[u8]]) -> TlsUpstream {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();

    let ca_file = std::env::temp_dir().join(format!(
        "llm-proxy-test-ca-{}-{}.pem",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let version = request.version();
                        let path = request.uri().path().to_string();
                        let authorization = request
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_string());
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        record.lock().push(Seen {
                            version,
                            path,
                            authorization,
                            body,
                        });
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"object":"list","data":[]}"#,
                                )))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        ca_file,
        seen,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

async fn app_for(upstream: &TlsUpstream, with_ca: bool) -> TestApp {
    let target = format!("https://127.0.0.1:{}", upstream.addr.port());
    let ca = upstream.ca_file.to_str().unwrap().to_string();
    let mut vars = vec![("TARGET_HOST", target.as_str())];
    if with_ca {
        vars.push(("UPSTREAM_CA_FILE", ca.as_str()));
    }
    spawn_app(&vars).await
}

#[tokio::test]
async fn a_private_ca_is_trusted_and_http2_is_negotiated_by_alpn() {
    let upstream = tls_upstream(&[b"h2", b"http/1.1"]).await;
    let app = app_for(&upstream, true).await;
    assert_eq!(app.models().await.unwrap().status(), 200);
    let chat = app
        .chat(
            CLIENT_TOKEN,
            serde_json::json!({"model": "m", "stream": false}),
        )
        .await;
    assert_eq!(chat.status(), 200);
    assert_eq!(chat.text().await.unwrap(), r#"{"object":"list","data":[]}"#);
    let seen = upstream.seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        assert_eq!(request.version, Version::HTTP_2, "{request:?}");
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {UPSTREAM_KEY}").as_str())
        );
    }
    assert_eq!(seen[0].path, "/v1/models");
    assert_eq!(seen[1].path, "/v1/chat/completions");
    assert_eq!(seen[1].body, r#"{"model":"m","stream":false}"#);
}

#[tokio::test]
async fn an_upstream_offering_only_http1_is_reached_over_http1() {
    let upstream = tls_upstream(&[b"http/1.1"]).await;
    let app = app_for(&upstream, true).await;
    assert_eq!(app.models().await.unwrap().status(), 200);
    let seen = upstream.seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn without_the_ca_file_the_private_upstream_is_refused() {
    let upstream = tls_upstream(&[b"h2", b"http/1.1"]).await;
    let app = app_for(&upstream, false).await;
    assert_json_error(
        app.models().await.unwrap(),
        502,
        "bad_gateway",
        "The upstream server could not be reached",
    )
    .await;
    assert!(upstream.seen.lock().is_empty());
}

/// The proxy in front of the mock in its HTTPS mode, which allows `max_streams` concurrent
/// HTTP/2 streams per connection, with `connections` pools (`UPSTREAM_HTTP2_CONNECTIONS`).
async fn app_behind_capped_http2(max_streams: u32, connections: usize) -> (TestApp, PathBuf) {
    let identity = mock_upstream::SelfSigned::generate().unwrap();
    let ca_file = std::env::temp_dir().join(format!("llm-proxy-h2-cap-{}.pem", rand_suffix()));
    std::fs::write(&ca_file, identity.cert_pem()).unwrap();
    let upstream = mock_upstream::MockUpstream::start_tls_on(
        "127.0.0.1:0".parse().unwrap(),
        true,
        identity,
        Some(max_streams),
    )
    .await
    .unwrap();
    let target = upstream.base_url();
    let connections = connections.to_string();
    let extra = [
        ("UPSTREAM_CA_FILE", ca_file.to_str().unwrap()),
        ("UPSTREAM_HTTP2_CONNECTIONS", connections.as_str()),
    ];
    let app = spawn_app_in_front_of(upstream, ("TARGET_HOST", &target), &extra).await;
    (app, ca_file)
}

/// How many of `total` slow streams the upstream is running at once: one request per pool
/// first (so that each has its HTTP/2 connection), then all the streams together.
async fn streams_running_at_once(app: &TestApp, connections: usize, total: usize) -> usize {
    for _ in 0..connections {
        let warm = app
            .chat(CLIENT_TOKEN, serde_json::json!({"model": "m"}))
            .await;
        assert_eq!(warm.status(), 200);
    }
    let streams: Vec<_> = (0..total)
        .map(|_| {
            let request = app
                .request_as(CLIENT_TOKEN, reqwest::Method::POST, "/v1/chat/completions")
                .header("x-mock-chunks", "3")
                .header("x-mock-interval-ms", "800")
                .json(&serde_json::json!({"model": "m", "stream": true}));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap()
            })
        })
        .collect();
    // Each stream lasts over two seconds: whatever has started within this time ran at once.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let running = app.upstream.streams_started();
    assert_eq!(
        app.upstream.streams_completed(),
        0,
        "no stream may have ended yet"
    );
    for stream in streams {
        let body = stream.await.unwrap();
        assert!(
            body.ends_with(b"data: [DONE]\n\n"),
            "every stream ends whole"
        );
    }
    running
}

#[tokio::test]
async fn streams_beyond_an_http2_upstreams_limit_wait_for_a_place_unless_there_are_more_pools() {
    // One connection: hyper's client queues what the upstream's limit does not let through.
    let (app, ca_file) = app_behind_capped_http2(4, 1).await;
    assert_eq!(streams_running_at_once(&app, 1, 8).await, 4);
    std::fs::remove_file(ca_file).unwrap();

    // Two pools taken in turn: two connections, all eight streams at once.
    let (app, ca_file) = app_behind_capped_http2(4, 2).await;
    assert_eq!(streams_running_at_once(&app, 2, 8).await, 8);
    std::fs::remove_file(ca_file).unwrap();
}
