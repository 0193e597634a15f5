//! WebSocket tunnels (the Realtime API) through the proxy, against a real WebSocket echo upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the echo upstream saw of each upgrade request.
#[derive(Clone, Debug)]
struct SeenUpgrade {
    uri: String,
    headers: Vec<(String, String)>,
}

impl SeenUpgrade {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

pub struct EchoUpstream {
    pub target: String,
    seen: Arc<Mutex<Vec<SeenUpgrade>>>,
    connections: Arc<AtomicUsize>,
}

/// A WebSocket server that echoes every message, answers `close-from-upstream` by closing, and
/// accepts the `realtime` subprotocol when offered.
pub async fn spawn_echo_upstream() -> EchoUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (record, count) = (seen.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let record = record.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let callback = |request: &Request, mut response: Response| {
                    let headers = request
                        .headers()
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.to_string(),
                                value.to_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect();
                    record.lock().push(SeenUpgrade {
                        uri: request.uri().to_string(),
                        headers,
                    });
                    let offered = request
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    if offered.split(',').any(|p| p.trim() == "realtime") {
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", "realtime".parse().unwrap());
                    }
                    Ok(response)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let echo = match message {
                        Message::Text(ref text) if text.as_str() == "close-from-upstream" => {
                            let _ = socket.close(None).await;
                            continue;
                        }
                        Message::Text(_) | Message::Binary(_) => message,
                        _ => continue,
                    };
                    if socket.send(echo).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    EchoUpstream {
        target,
        seen,
        connections,
    }
}

async fn spawn_app_before(echo: &EchoUpstream, extra: &[(&str, &str)]) -> TestApp {
    let mut vars = vec![("TARGET_HOST", echo.target.as_str())];
    vars.extend_from_slice(extra);
    spawn_app(&vars).await
}

/// Opens `ws://proxy/v1/realtime?model=gpt-realtime` with `headers`.
async fn connect(app: &TestApp, headers: &[(&str, &str)]) -> Result<Socket, WsError> {
    let url = format!("ws://{}/v1/realtime?model=gpt-realtime", app.addr);
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        let name: warp::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

async fn connect_as_client(app: &TestApp) -> Socket {
    let bearer = format!("Bearer {CLIENT_TOKEN}");
    connect(app, &[("authorization", bearer.as_str())])
        .await
        .expect("the tunnel opens")
}

/// The next data message, skipping control frames; `None` when the tunnel ended.
async fn next_message(socket: &mut Socket) -> Option<Message> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("no message within 5 s")
        {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Some(message),
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn messages_cross_the_tunnel_both_ways_byte_for_byte() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[]).await;
    let mut socket = connect_as_client(&app).await;

    let large: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("{\"type\":\"session.update\"}"),
        Message::binary(vec![0u8, 159, 146, 150, 255]),
        Message::binary(large),
    ];
    for message in messages {
        socket.send(message.clone()).await.unwrap();
        assert_eq!(next_message(&mut socket).await, Some(message));
    }

    socket.close(None).await.unwrap();
    assert!(
        matches!(next_message(&mut socket).await, Some(Message::Close(_))),
        "the upstream answers the close"
    );
    assert_eq!(next_message(&mut socket).await, None);
    let seen = echo.seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/realtime?model=gpt-realtime");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(seen[0].header("upgrade"), Some("websocket"));
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(_, value)| !value.contains(CLIENT_TOKEN)),
        "the client's token reached the upstream: {:?}",
        seen[0].headers
    );
    assert!(
        eventually(Duration::from_secs(3), async || {
            app.state.metrics.requests_in_flight().get() == 0
        })
        .await,
        "the tunnel's request ended with it"
    );
}

#[tokio::test]
async fn the_upstream_can_close_the_tunnel() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[]).await;
    let mut socket = connect_as_client(&app).await;
    socket
        .send(Message::text("close-from-upstream"))
        .await
        .unwrap();
    assert!(matches!(
        next_message(&mut socket).await,
        Some(Message::Close(_))
    ));
    assert_eq!(next_message(&mut socket).await, None);
}

#[tokio::test]
async fn a_websocket_without_a_token_gets_401_before_any_upgrade() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[]).await;
    let refused = connect(&app, &[]).await.unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), 401);
    let body = response.body().as_deref().unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(
        echo.connections.load(Ordering::SeqCst),
        0,
        "nothing was sent upstream"
    );
}

#[tokio::test]
async fn a_browser_token_in_the_subprotocol_is_accepted_and_not_forwarded() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[]).await;
    let protocols = format!("realtime, openai-insecure-api-key.{CLIENT_TOKEN}");
    let mut socket = connect(&app, &[("sec-websocket-protocol", protocols.as_str())])
        .await
        .expect("the subprotocol token opens the tunnel");
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::text("hello"))
    );
    let seen = echo.seen.lock().clone();
    assert_eq!(seen[0].header("sec-websocket-protocol"), Some("realtime"));
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );

    let wrong = connect(
        &app,
        &[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.not-a-client",
        )],
    )
    .await
    .unwrap_err();
    assert!(matches!(wrong, WsError::Http(response) if response.status() == 401));
}

#[tokio::test]
async fn an_upstream_that_refuses_the_upgrade_has_its_answer_passed_through() {
    use warp::Filter;
    let refusing = warp::path!("v1" / "realtime").map(|| {
        warp::http::Response::builder()
            .status(403)
            .header("content-type", "application/json")
            .body(r#"{"error":{"message":"realtime is not enabled"}}"#)
            .unwrap()
    });
    let target = format!("http://{}", spawn_server(refusing).await);
    let app = spawn_app(&[("TARGET_HOST", target.as_str())]).await;
    let refused = connect_as_client_result(&app).await.unwrap_err();
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.body().as_deref(),
        Some(&br#"{"error":{"message":"realtime is not enabled"}}"#[..])
    );
}

async fn connect_as_client_result(app: &TestApp) -> Result<Socket, WsError> {
    let bearer = format!("Bearer {CLIENT_TOKEN}");
    connect(app, &[("authorization", bearer.as_str())]).await
}

#[tokio::test]
async fn an_open_tunnel_holds_its_place_in_max_concurrent_requests() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[("MAX_CONCURRENT_REQUESTS", "1")]).await;
    // Any admitted request will do; an unknown path never asks the (WebSocket-only) upstream.
    let probe = || app.client.get(app.url("/nowhere")).send();
    let mut socket = connect_as_client(&app).await;
    assert_json_error(
        probe().await.unwrap(),
        503,
        "overloaded",
        "Too many requests in flight; retry shortly",
    )
    .await;
    socket.close(None).await.unwrap();
    while next_message(&mut socket).await.is_some() {}
    let status = eventually(Duration::from_secs(2), async || {
        let status = probe().await.unwrap().status().as_u16();
        (status != 503).then_some(status)
    })
    .await
    .unwrap_or(503);
    assert_eq!(
        status, 404,
        "the place was given back when the tunnel closed"
    );
}

#[tokio::test]
async fn a_silent_tunnel_is_cut_after_the_idle_timeout() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_before(&echo, &[("STREAM_IDLE_TIMEOUT_SECS", "1")]).await;
    let mut socket = connect_as_client(&app).await;
    socket.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::text("still here"))
    );
    let silent_from = Instant::now();
    assert_eq!(next_message(&mut socket).await, None, "the tunnel was cut");
    let silent = silent_from.elapsed();
    assert!(
        silent >= Duration::from_millis(900) && silent < Duration::from_secs(4),
        "cut after {silent:?}"
    );
}

#[tokio::test]
async fn the_drain_lets_a_tunnel_run_and_closes_it_at_the_end_of_the_grace_period() {
    let echo = spawn_echo_upstream().await;
    let mut app = spawn_app_before(&echo, &[("SHUTDOWN_GRACE_SECS", "1")]).await;
    let mut socket = connect_as_client(&app).await;
    let started = Instant::now();
    let server = app.begin_shutdown();
    socket
        .send(Message::text("during the drain"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut socket).await,
        Some(Message::text("during the drain")),
        "a tunnel keeps working while the drain waits"
    );
    tokio::time::timeout(Duration::from_secs(4), server)
        .await
        .expect("the drain is bounded by its grace period")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        next_message(&mut socket).await,
        None,
        "the tunnel was closed"
    );
}

const REALTIME_CLIENTS: &str = r#"
[clients.voice]
token = "tok-voice"
models = ["gpt-realtime*"]
max_concurrent_requests = 1
"#;

async fn spawn_app_with_clients_before(echo: &EchoUpstream) -> TestApp {
    let file = crate::clients::scratch_dir("realtime-clients").join("clients.toml");
    std::fs::write(&file, REALTIME_CLIENTS).unwrap();
    spawn_app_before(echo, &[("CLIENTS_FILE", file.to_str().unwrap())]).await
}

async fn connect_to(app: &TestApp, query: &str) -> Result<Socket, WsError> {
    let url = format!("ws://{}/v1/realtime{query}", app.addr);
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer tok-voice".parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

fn refusal_code(refused: WsError) -> (u16, String) {
    let WsError::Http(response) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    let body: serde_json::Value =
        serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
    (
        response.status().as_u16(),
        body["error"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_realtime_model_is_checked_against_the_clients_list_before_the_upgrade() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_with_clients_before(&echo).await;
    let forbidden = connect_to(&app, "?model=gpt-4o").await.unwrap_err();
    assert_eq!(
        refusal_code(forbidden),
        (403, "model_not_allowed".to_string())
    );
    let unnamed = connect_to(&app, "").await.unwrap_err();
    assert_eq!(refusal_code(unnamed), (400, "model_required".to_string()));
    assert_eq!(
        echo.connections.load(Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
    let mut allowed = connect_to(&app, "?model=gpt-realtime-mini").await.unwrap();
    allowed.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut allowed).await, Some(Message::text("hi")));
}

#[tokio::test]
async fn an_open_tunnel_holds_its_clients_concurrency_place() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_with_clients_before(&echo).await;
    let mut tunnel = connect_to(&app, "?model=gpt-realtime").await.unwrap();
    let second = connect_to(&app, "?model=gpt-realtime").await.unwrap_err();
    assert_eq!(refusal_code(second), (429, "rate_limited".to_string()));
    tunnel.close(None).await.unwrap();
    while next_message(&mut tunnel).await.is_some() {}
    let again = eventually(Duration::from_secs(2), async || {
        connect_to(&app, "?model=gpt-realtime").await.ok()
    })
    .await;
    assert!(
        again.is_some(),
        "the place came back when the tunnel closed"
    );
}

#[tokio::test]
async fn a_tunnel_naming_its_model_twice_or_going_elsewhere_is_refused_before_the_upgrade() {
    let echo = spawn_echo_upstream().await;
    let app = spawn_app_with_clients_before(&echo).await;
    for query in [
        "?model=gpt-realtime&model=gpt-4o",
        "?model=gpt-realtime&%6Dodel=gpt-4o",
        "?model=gpt-realtime&model=gpt-realtime",
    ] {
        let twice = connect_to(&app, query).await.unwrap_err();
        assert_eq!(
            refusal_code(twice),
            (400, "invalid_request".to_string()),
            "{query}"
        );
    }
    // Elsewhere the model is in messages the proxy does not read: the query proves nothing.
    let mut request = format!("ws://{}/v1/responses?model=gpt-realtime", app.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer tok-voice".parse().unwrap());
    let elsewhere = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert_eq!(
        refusal_code(elsewhere),
        (403, "endpoint_not_allowed".to_string())
    );
    assert_eq!(
        echo.connections.load(Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
    let mut allowed = connect_to(&app, "?model=gpt-realtime&voice=alloy")
        .await
        .unwrap();
    allowed.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut allowed).await, Some(Message::text("hi")));
    assert_eq!(
        echo.seen.lock()[0].uri,
        "/v1/realtime?model=gpt-realtime&voice=alloy"
    );
}
