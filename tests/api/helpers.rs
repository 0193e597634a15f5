//! What the tests share: starting the proxy (in process or as the binary) in front of a mock
//! upstream, waiting for what happens in the background, raw sockets, and assertions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use llm_proxy::server::ShutdownTrigger;
use llm_proxy::{AppState, Config};
use mock_upstream::{MockOptions, MockUpstream};
use tokio::net::TcpListener;

mod start;
mod wait;

pub use start::{Proxy, RunningProxy, TEST_SETTINGS, drain};
pub use wait::eventually;

pub const UPSTREAM_KEY: &str = "sk-upstream-secret-key";
pub const CLIENT_TOKEN: &str = "client-token-1";
pub const ADMIN_TOKEN: &str = "admin-token-xyz";

/// Client `name`'s entry in `/admin/clients` of the proxy at `base` (read with `ADMIN_TOKEN`):
/// its usage and limits; `None` when it is not listed.
pub async fn admin_client(base: &str, name: &str) -> Option<serde_json::Value> {
    let listed: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/admin/clients"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the proxy answers /admin/clients")
        .json()
        .await
        .expect("/admin/clients is JSON");
    listed["clients"]
        .as_array()
        .expect("/admin/clients lists clients")
        .iter()
        .find(|client| client["name"] == name)
        .cloned()
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The state the server runs with (shared: it sees the server's metrics and drain flag).
    pub state: AppState,
    pub upstream: MockUpstream,
    pub client: reqwest::Client,
    pub shutdown: ShutdownTrigger,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Asks the server to drain; the handle resolves when it has stopped.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        self.shutdown.trigger();
        self.server.take().expect("server already shut down")
    }

    /// `method path` as `token`, to be finished by the caller.
    pub fn request_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token)
    }

    /// `method path` as `CLIENT_TOKEN`, to be finished by the caller.
    pub fn authorised(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_as(CLIENT_TOKEN, method, path)
    }

    /// `POST /v1/chat/completions` as `CLIENT_TOKEN`, without a body yet.
    pub fn chat_request(&self) -> reqwest::RequestBuilder {
        self.authorised(reqwest::Method::POST, "/v1/chat/completions")
    }

    /// A streamed chat request as `CLIENT_TOKEN`: the mock sends `chunks` content events
    /// `interval_ms` apart, and a final usage event.
    pub fn stream_chat(&self, chunks: u32, interval_ms: u32) -> reqwest::RequestBuilder {
        self.chat_request()
            .header("x-mock-chunks", chunks.to_string())
            .header("x-mock-interval-ms", interval_ms.to_string())
            .json(&serde_json::json!({
                "model": "gpt-mock",
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hi"}]
            }))
    }

    /// GET /v1/models as `CLIENT_TOKEN`.
    pub async fn models(&self) -> reqwest::Result<reqwest::Response> {
        self.authorised(reqwest::Method::GET, "/v1/models")
            .send()
            .await
    }

    /// GET `path` with the admin token (operator endpoints: `/metrics`, `/admin/...`).
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request to the proxy failed")
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.admin_get("/metrics").await.text().await.unwrap()
    }

    /// One series of `/metrics`, exactly as written there (`name{labels}`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
    }

    /// Sends a request whose declared body never fully arrives and asserts the proxy answers 408
    /// within the one-second UPSTREAM_TIMEOUT_SECS the test set, sending nothing upstream.
    pub async fn assert_a_stalled_body_is_408(&self, token: &str) {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
        );
        let started = std::time::Instant::now();
        let reply = raw_exchange(self.addr, request.as_bytes(), Duration::from_secs(4)).await;
        assert_eq!(reply.status(), 408, "{}", reply.text);
        assert!(
            reply.text.contains("\"error\":\"request_timeout\""),
            "{}",
            reply.text
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(self.upstream.requests_started(), 0, "nothing went upstream");
    }

    pub async fn chat(&self, token: &str, body: serde_json::Value) -> reqwest::Response {
        self.request_as(token, reqwest::Method::POST, "/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .expect("request to the proxy failed")
    }
}

/// The proxy with validation on (token `CLIENT_TOKEN`), an admin token, and `extra` on top.
pub async fn spawn_app(extra: &[(&str, &str)]) -> TestApp {
    Proxy::new()
        .upstream(MockUpstream::start().await)
        .envs(TEST_SETTINGS)
        .envs(extra)
        .start_in_process()
        .await
}

/// The proxy in front of a mock serving as `options` say, reached through
/// `TARGET_BASE_URL` = the mock's address + its mount, with `extra` on top.
pub async fn spawn_app_mounted(options: MockOptions, extra: &[(&str, &str)]) -> TestApp {
    let mount = options.mount.clone().unwrap_or_default();
    let upstream = MockUpstream::start_with(options).await;
    let base = format!("{}{mount}", upstream.base_url());
    spawn_app_in_front_of(upstream, ("TARGET_BASE_URL", &base), extra).await
}

/// [`spawn_app`]'s settings with `target` (`TARGET_HOST` or `TARGET_BASE_URL`) naming
/// `upstream`, and `extra` on top.
pub async fn spawn_app_in_front_of(
    upstream: MockUpstream,
    target: (&str, &str),
    extra: &[(&str, &str)],
) -> TestApp {
    Proxy::new()
        .owning(upstream)
        .env(target.0, target.1)
        .envs(TEST_SETTINGS)
        .envs(extra)
        .start_in_process()
        .await
}

/// [`spawn_app`] in front of a server running `filter`, a test's own upstream, and `extra` on
/// top.
pub async fn spawn_app_before_server<F>(filter: F, extra: &[(&str, &str)]) -> TestApp
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let target = format!("http://{}", spawn_server(filter).await);
    Proxy::new()
        .env("TARGET_HOST", target)
        .envs(TEST_SETTINGS)
        .envs(extra)
        .start_in_process()
        .await
}

/// The proxy configured with exactly `vars` (later entries win), in front of `upstream`.
pub async fn spawn_app_with_upstream(upstream: MockUpstream, vars: &[(&str, &str)]) -> TestApp {
    Proxy::new()
        .owning(upstream)
        .envs(vars)
        .start_in_process()
        .await
}

pub fn config_from(vars: &[(&str, &str)]) -> Config {
    Config::from_lookup(|name| {
        vars.iter()
            .rev()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    })
    .expect("valid test configuration")
}

/// A listener-backed server for one test's own misbehaving or recording upstream.
pub async fn spawn_server<F>(filter: F) -> SocketAddr
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(warp::serve(filter).incoming(listener).run());
    addr
}

pub fn assert_rfc3339(time: &str) {
    assert!(
        humantime::parse_rfc3339(time).is_ok(),
        "{time:?} is not an RFC 3339 timestamp"
    );
}

/// Asserts the proxy's own JSON error shape, exactly.
pub async fn assert_json_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
    message: &str,
) {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "error bodies are JSON"
    );
    let body: serde_json::Value = response.json().await.expect("JSON body");
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 3, "exactly error, message and time: {body}");
    assert_eq!(body["error"], code);
    assert_eq!(body["message"], message);
    assert_rfc3339(body["time"].as_str().expect("time is a string"));
}

/// What a raw client saw: everything the server sent, and whether it closed the connection.
pub struct RawReply {
    pub text: String,
    pub closed: bool,
}

impl RawReply {
    pub fn status(&self) -> u16 {
        self.text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    /// First value of a response header; `name` is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        let head = self.text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Writes raw bytes to `addr` and reads until the server closes or `wait` passes without new
/// data, for requests no well-behaved client would send.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before reading everything; that is not a test failure.
    let _ = stream.write_all(request).await;
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(wait, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => break false,
        }
    };
    RawReply {
        text: String::from_utf8_lossy(&received).into_owned(),
        closed,
    }
}

/// The request heads a raw upstream has read, in the order it finished reading them.
pub type RawHeads = Arc<Mutex<Vec<String>>>;

/// An upstream written against raw sockets, for misbehaviour no HTTP library would produce.
/// `handle` gets each accepted connection after its request head was read and recorded.
pub async fn spawn_raw_upstream<F, Fut>(handle: F) -> (String, RawHeads)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let heads = RawHeads::default();
    let recorded = heads.clone();
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let recorded = recorded.clone();
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => head.extend_from_slice(&buffer[..read]),
                    }
                }
                recorded
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                handle(socket).await;
            });
        }
    });
    (format!("http://{addr}"), heads)
}

/// Reads a streamed response to its end and returns the bytes received and whether it ended
/// in an error (a truncated transfer) rather than cleanly.
pub async fn read_stream(response: reqwest::Response) -> (String, bool) {
    read_rest(response.bytes_stream()).await
}

/// [`read_stream`] for a body already partly read.
pub async fn read_rest(
    mut body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> (String, bool) {
    let mut received = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => received.extend_from_slice(&chunk),
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), false)
}
