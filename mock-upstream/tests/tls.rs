//! The HTTPS mode over a real listener: a rustls client that trusts the mock's self-signed
//! certificate sees `h2` chosen by ALPN and gets its answers over HTTP/2; a client offering only
//! `http/1.1` gets HTTP/1.1; the binary writes the certificate and says `https://`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_upstream::{MockUpstream, SelfSigned};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to `addr` trusting only `cert_pem`, offering `alpn`.
async fn connect(addr: SocketAddr, cert_pem: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.expect("PEM certificate")).expect("trusted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("TLS handshake")
}

fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("https://{addr}{path}"))
        .body(Empty::new())
        .expect("request")
}

async fn start_tls(max_streams: Option<u32>) -> (MockUpstream, SelfSigned) {
    let identity = SelfSigned::generate().expect("certificate");
    let mock = MockUpstream::start_tls_on(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        true,
        identity.clone(),
        max_streams,
    )
    .await
    .expect("start TLS mock");
    (mock, identity)
}

/// `count` requests the mock answers only after 10 s, sent at once on one HTTP/2 connection;
/// abort the tasks to end them.
async fn hold_slow_requests(
    mock: &MockUpstream,
    identity: &SelfSigned,
    count: usize,
) -> Vec<tokio::task::JoinHandle<hyper::Result<hyper::Response<hyper::body::Incoming>>>> {
    let addr = mock.addr();
    let tls = connect(addr, identity.cert_pem(), &[b"h2"]).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    (0..count)
        .map(|_| {
            let mut sender = sender.clone();
            let request = Request::get(format!("https://{addr}/v1/models"))
                .header("x-mock-delay-ms", "10000")
                .body(Empty::<Bytes>::new())
                .expect("request");
            tokio::spawn(async move { sender.send_request(request).await })
        })
        .collect()
}

/// Polls `done` for up to `within`.
async fn eventually(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

#[tokio::test]
async fn tls_mode_negotiates_h2_and_streams_over_it() {
    let (mock, identity) = start_tls(None).await;
    let addr = mock.addr();
    assert_eq!(mock.base_url(), format!("https://{addr}"));

    let tls = connect(addr, identity.cert_pem(), &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);

    let models = sender
        .send_request(get(addr, "/v1/models"))
        .await
        .expect("models");
    assert_eq!(models.status(), 200);
    assert_eq!(models.version(), Version::HTTP_2);
    let body = models.into_body().collect().await.expect("body").to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["object"], "list");

    let chat = Request::post(format!("https://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-mock-chunks", "3")
        .header("x-mock-interval-ms", "1")
        .body(http_body_util::Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","stream":true}"#,
        )))
        .expect("request");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(connect(addr, identity.cert_pem(), &[b"h2"]).await),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let stream = sender.send_request(chat).await.expect("chat");
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.version(), Version::HTTP_2);
    let body = stream.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    // Role, three contents, finish, [DONE].
    assert_eq!(text.matches("\n\n").count(), 6, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(mock.streams_completed(), 1);
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn one_h2_connection_carries_more_streams_than_hyper_s_default_limit() {
    // hyper's server would advertise 200 concurrent streams; the mock advertises no limit, so a
    // proxy can put a whole benchmark's streams on one connection.
    let (mock, identity) = start_tls(None).await;
    let held = hold_slow_requests(&mock, &identity, 300).await;
    assert!(
        eventually(Duration::from_secs(5), || mock.requests_started() == 300).await,
        "only {} of 300 streams reached the mock",
        mock.requests_started()
    );
    for task in held {
        task.abort();
    }
}

#[tokio::test]
async fn h2_max_streams_caps_the_streams_of_a_connection() {
    let (mock, identity) = start_tls(Some(2)).await;
    let held = hold_slow_requests(&mock, &identity, 3).await;
    assert!(eventually(Duration::from_secs(5), || mock.requests_started() == 2).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.requests_started(),
        2,
        "the third stream waits for a place"
    );
    for task in held {
        task.abort();
    }
}

#[tokio::test]
async fn a_client_offering_only_http1_is_served_http1() {
    let (mock, identity) = start_tls(None).await;
    let addr = mock.addr();
    let tls = connect(addr, identity.cert_pem(), &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let request = Request::get("/v1/models")
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let models = sender.send_request(request).await.expect("models");
    assert_eq!(models.status(), 200);
    assert_eq!(models.version(), Version::HTTP_11);
    assert_eq!(mock.models_fetches(), 1);
}

#[tokio::test]
async fn binary_writes_its_certificate_and_serves_https() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::process::Command;

    let dir = std::env::temp_dir().join(format!(
        "mock-upstream-tls-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--port", "0", "--no-record", "--tls-self-signed"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mock-upstream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await
        .expect("read first line");
    let addr: SocketAddr = line
        .trim_end()
        .strip_prefix("mock-upstream listening on https://")
        .expect("an https listening line")
        .parse()
        .expect("HOST:PORT");
    let cert_pem = std::fs::read_to_string(dir.join("cert.pem")).expect("DIR/cert.pem");

    let tls = connect(addr, &cert_pem, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let models = sender
        .send_request(get(addr, "/v1/models"))
        .await
        .expect("models");
    assert_eq!(models.status(), 200);
    assert_eq!(models.version(), Version::HTTP_2);

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops on SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
