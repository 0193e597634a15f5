//! Drives the mock over raw HTTP/1.1 so the chunk boundaries it produces are
//! visible exactly as a client sees them (no HTTP client library in between).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mock_upstream::{MockOptions, MockUpstream};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    /// The de-chunked body.
    body: Vec<u8>,
    /// The body's chunks as framed by the server (`None` if not chunked).
    chunks: Option<Vec<Vec<u8>>>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }
}

fn request_bytes(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(raw: &[u8]) -> RawResponse {
    let head_end = find(raw, b"\r\n\r\n").expect("complete response head");
    let head = std::str::from_utf8(&raw[..head_end]).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let rest = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if !chunked {
        return RawResponse {
            status,
            headers,
            body: rest.to_vec(),
            chunks: None,
        };
    }
    let mut chunks = Vec::new();
    let mut pos = 0;
    loop {
        let line_end = pos + find(&rest[pos..], b"\r\n").expect("chunk size line");
        let size_str = std::str::from_utf8(&rest[pos..line_end]).expect("UTF-8 size");
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        pos = line_end + 2;
        if size == 0 {
            break;
        }
        chunks.push(rest[pos..pos + size].to_vec());
        pos += size + 2;
    }
    RawResponse {
        status,
        headers,
        body: chunks.concat(),
        chunks: Some(chunks),
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_bytes(addr, method, target, headers, body))
        .await
        .expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    parse_response(&raw)
}

fn chunk_json(model: &str, choices: &str, tail: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}\",\"system_fingerprint\":null,\"choices\":{choices}{tail}}}\n\n"
    )
}

fn expected_events(model: &str, n: usize, include_usage: bool) -> Vec<String> {
    let tail = if include_usage { ",\"usage\":null" } else { "" };
    let choice = |delta: &str, finish: &str| {
        format!("[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]")
    };
    let mut events = vec![chunk_json(
        model,
        &choice("{\"role\":\"assistant\",\"content\":\"\"}", "null"),
        tail,
    )];
    for i in 0..n {
        events.push(chunk_json(
            model,
            &choice(&format!("{{\"content\":\"chunk-{i} \"}}"), "null"),
            tail,
        ));
    }
    events.push(chunk_json(model, &choice("{}", "\"stop\""), tail));
    if include_usage {
        events.push(chunk_json(
            model,
            "[]",
            &format!(
                ",\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{n},\"total_tokens\":{}}}",
                7 + n
            ),
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

#[tokio::test]
async fn plain_chat_returns_openai_json() {
    let mock = MockUpstream::start().await;
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let res = send(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer sk-upstream"),
        ],
        body,
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.header("x-request-id"), Some("req_mock_chat"));
    assert_eq!(res.header("openai-processing-ms"), Some("1"));
    assert_eq!(res.header("x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(res.header("x-ratelimit-remaining-requests"), Some("99"));
    assert_eq!(
        res.json(),
        json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-4o",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the mock upstream.", "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13},
            "system_fingerprint": null
        })
    );

    let recorded = mock.last_request().expect("request recorded");
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/v1/chat/completions");
    assert_eq!(recorded.query, None);
    assert_eq!(recorded.header("AUTHORIZATION"), Some("Bearer sk-upstream"));
    assert_eq!(&recorded.body[..], &body[..]);
    assert_eq!(recorded.json().expect("JSON body")["model"], "gpt-4o");
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.streams_started(), 0);
}

#[tokio::test]
async fn default_model_and_invalid_json() {
    let mock = MockUpstream::start().await;
    let res = send(mock.addr(), "POST", "/v1/chat/completions", &[], b"{}").await;
    assert_eq!(res.json()["model"], "gpt-mock");

    let res = send(mock.addr(), "POST", "/v1/chat/completions", &[], b"{nope").await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn streamed_chat_arrives_event_by_event() {
    let mock = MockUpstream::start().await;
    let body = br#"{"model":"gpt-mock","stream":true,"messages":[]}"#;
    let res = send(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        &[("x-mock-chunks", "3"), ("x-mock-interval-ms", "1")],
        body,
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("text/event-stream"));
    assert_eq!(res.header("cache-control"), Some("no-cache"));
    assert_eq!(res.header("x-request-id"), Some("req_mock_stream"));

    let chunks = res.chunks.as_ref().expect("a chunked, streamed body");
    let got: Vec<String> = chunks
        .iter()
        .map(|c| String::from_utf8(c.clone()).expect("UTF-8 event"))
        .collect();
    assert_eq!(got, expected_events("gpt-mock", 3, false));
    assert!(res.body.ends_with(b"data: [DONE]\n\n"));

    // Every event must be valid JSON of the shape the OpenAI SDK expects.
    for event in &got[..got.len() - 1] {
        let value: Value = serde_json::from_str(
            event
                .strip_prefix("data: ")
                .and_then(|e| e.strip_suffix("\n\n"))
                .expect("data: framing"),
        )
        .expect("event JSON");
        assert_eq!(value["object"], "chat.completion.chunk");
    }

    assert_eq!(mock.streams_started(), 1);
    assert_eq!(mock.streams_completed(), 1);
    assert_eq!(mock.streams_cancelled(), 0);
    assert_eq!(mock.last_stream_bytes().as_deref(), Some(&res.body[..]));
}

#[tokio::test]
async fn streamed_chat_with_usage_is_deterministic() {
    let mock = MockUpstream::start().await;
    let body = br#"{"model":"m\"x","stream":true,"stream_options":{"include_usage":true}}"#;
    let headers = [("x-mock-chunks", "2"), ("x-mock-interval-ms", "0")];
    let first = send(mock.addr(), "POST", "/v1/chat/completions", &headers, body).await;
    let second = send(mock.addr(), "POST", "/v1/chat/completions", &headers, body).await;
    assert_eq!(first.body, second.body);
    let got: Vec<String> = first
        .chunks
        .expect("chunked")
        .into_iter()
        .map(|c| String::from_utf8(c).expect("UTF-8"))
        .collect();
    assert_eq!(got, expected_events("m\\\"x", 2, true));
    assert_eq!(mock.streams_completed(), 2);
}

#[tokio::test]
async fn mock_status_429_carries_rate_limit_headers() {
    let mock = MockUpstream::start().await;
    let res = send(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        &[("x-mock-status", "429")],
        br#"{"stream":true}"#,
    )
    .await;
    assert_eq!(res.status, 429);
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.header("retry-after"), Some("1"));
    assert_eq!(res.header("x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(res.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(res.header("x-request-id"), Some("req_mock_error"));
    assert_eq!(res.header("openai-processing-ms"), Some("1"));
    assert_eq!(
        res.json(),
        json!({"error": {
            "message": "mock upstream error 429",
            "type": "requests",
            "param": null,
            "code": "rate_limit_exceeded"
        }})
    );
    assert_eq!(mock.streams_started(), 0);

    let res = send(
        mock.addr(),
        "GET",
        "/v1/models",
        &[("x-mock-status", "401")],
        b"",
    )
    .await;
    assert_eq!(res.status, 401);
    assert_eq!(res.json()["error"]["code"], "invalid_api_key");
    let res = send(
        mock.addr(),
        "GET",
        "/nope",
        &[("x-mock-status", "503")],
        b"",
    )
    .await;
    assert_eq!(res.status, 503);
    assert_eq!(res.json()["error"]["type"], "server_error");
}

#[tokio::test]
async fn models_are_listed_and_counted() {
    let mock = MockUpstream::start().await;
    let res = send(mock.addr(), "GET", "/v1/models", &[], b"").await;
    assert_eq!(res.status, 200);
    let ids: Vec<String> = res.json()["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["gpt-mock", "gpt-mock-mini", "text-embedding-mock"]);
    assert_eq!(res.json()["data"][0]["owned_by"], "mock");

    let _ = send(
        mock.addr(),
        "GET",
        "/v1/models",
        &[("x-mock-status", "500")],
        b"",
    )
    .await;
    let one = send(mock.addr(), "GET", "/v1/models/gpt-mock-mini", &[], b"").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "gpt-mock-mini");
    let missing = send(mock.addr(), "GET", "/v1/models/nope", &[], b"").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");

    assert_eq!(mock.models_fetches(), 2);
}

#[tokio::test]
async fn embeddings_for_string_and_array() {
    let mock = MockUpstream::start().await;
    let res = send(
        mock.addr(),
        "POST",
        "/v1/embeddings",
        &[],
        br#"{"model":"text-embedding-mock","input":["one two","three"]}"#,
    )
    .await;
    assert_eq!(res.status, 200);
    let v = res.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));

    let single = send(
        mock.addr(),
        "POST",
        "/v1/embeddings",
        &[],
        br#"{"input":"three"}"#,
    )
    .await;
    assert_eq!(
        single.json()["data"][0]["embedding"],
        v["data"][1]["embedding"]
    );

    let b64 = send(
        mock.addr(),
        "POST",
        "/v1/embeddings",
        &[],
        br#"{"input":"three","encoding_format":"base64"}"#,
    )
    .await;
    // 8 f32 = 32 bytes = 44 base64 characters.
    assert_eq!(
        b64.json()["data"][0]["embedding"].as_str().map(str::len),
        Some(44)
    );

    let bad = send(
        mock.addr(),
        "POST",
        "/v1/embeddings",
        &[],
        br#"{"input":5}"#,
    )
    .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn other_v1_paths_are_echoed_and_recorded() {
    let mock = MockUpstream::start().await;
    let body =
        b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--xyz--\r\n";
    let res = send(
        mock.addr(),
        "PUT",
        "/v1/files/abc%20d?a=1&b=2",
        &[
            ("Content-Type", "multipart/form-data; boundary=xyz"),
            ("X-Foo", "a"),
            ("X-Foo", "b"),
        ],
        body,
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.json(),
        json!({
            "object": "echo",
            "method": "PUT",
            "path": "/v1/files/abc%20d",
            "query": "a=1&b=2",
            "body_bytes": body.len(),
            "content_type": "multipart/form-data; boundary=xyz"
        })
    );
    let recorded = mock.last_request().expect("recorded");
    assert_eq!(recorded.path, "/v1/files/abc%20d");
    assert_eq!(recorded.query.as_deref(), Some("a=1&b=2"));
    assert_eq!(recorded.header_values("x-foo"), ["a", "b"]);
    assert!(
        recorded
            .headers
            .iter()
            .all(|(n, _)| *n == n.to_ascii_lowercase())
    );
    assert_eq!(&recorded.body[..], &body[..]);
    assert!(recorded.json().is_none());

    let res = send(mock.addr(), "DELETE", "/v1/models/gpt-mock", &[], b"").await;
    assert_eq!(res.json()["object"], "echo");
    let res = send(mock.addr(), "GET", "/v1/chat/completions?limit=2", &[], b"").await;
    assert_eq!(res.json()["query"], "limit=2");
    assert_eq!(res.json()["content_type"], Value::Null);

    let res = send(mock.addr(), "GET", "/health", &[], b"").await;
    assert_eq!(res.status, 404);
    assert_eq!(res.json()["error"]["type"], "invalid_request_error");
    assert_eq!(mock.requests().len(), 4);
}

#[tokio::test]
async fn a_mock_of_its_own_lists_and_knows_only_its_models() {
    let mock = MockUpstream::start_with(MockOptions {
        models: Some(vec![
            "o3".to_string(),
            "meta-llama/Llama-3.1-8B".to_string(),
        ]),
        ..MockOptions::default()
    })
    .await;
    let res = send(mock.addr(), "GET", "/v1/models", &[], b"").await;
    let ids: Vec<String> = res.json()["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["o3", "meta-llama/Llama-3.1-8B"]);
    assert_eq!(
        send(mock.addr(), "GET", "/v1/models/o3", &[], b"")
            .await
            .status,
        200
    );
    let missing = send(mock.addr(), "GET", "/v1/models/gpt-mock", &[], b"").await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn delayed_heads_hold_back_every_answer_until_switched_off() {
    let mock = MockUpstream::start().await;
    mock.answer_key("sk-slow", 503, &[]);
    mock.delay_heads(Duration::from_millis(300));
    let started = Instant::now();
    let res = send(mock.addr(), "GET", "/v1/models", &[], b"").await;
    assert_eq!(res.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    let keyed = send(
        mock.addr(),
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sk-slow")],
        b"",
    )
    .await;
    assert_eq!(keyed.status, 503);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "a key's answer waits too"
    );

    mock.delay_heads(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(
        send(mock.addr(), "GET", "/v1/models", &[], b"")
            .await
            .status,
        200
    );
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(mock.requests_started(), 3);
}

#[tokio::test]
async fn delay_holds_back_the_response() {
    let mock = MockUpstream::start().await;
    let started = Instant::now();
    let res = send(
        mock.addr(),
        "GET",
        "/v1/models",
        &[("x-mock-delay-ms", "200")],
        b"",
    )
    .await;
    assert_eq!(res.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn client_drop_mid_stream_counts_as_cancelled() {
    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_bytes(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("x-mock-interval-ms", "200"), ("x-mock-chunks", "20")],
            br#"{"stream":true}"#,
        ))
        .await
        .expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Head, then the first event (which ends with a blank line of its own).
    while find(&seen, b"\r\n\r\n").is_none_or(|head| find(&seen[head + 4..], b"\n\n").is_none()) {
        let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .expect("first event in time")
            .expect("read");
        assert!(n > 0, "connection closed before the first event");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(mock.streams_started(), 1);
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.streams_cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.streams_cancelled(), 1);
    assert_eq!(mock.streams_completed(), 0);
    let partial = mock.last_stream_bytes().expect("stream bytes");
    assert!(partial.starts_with(b"data: {"));
    assert!(!partial.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn without_recording_counts_but_keeps_nothing() {
    let mock = MockUpstream::start_without_recording_on(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let _ = send(mock.addr(), "GET", "/v1/models", &[], b"").await;
    let res = send(
        mock.addr(),
        "POST",
        "/v1/chat/completions",
        &[("x-mock-interval-ms", "0")],
        br#"{"stream":true}"#,
    )
    .await;
    assert!(res.body.ends_with(b"data: [DONE]\n\n"));
    assert!(mock.requests().is_empty());
    assert!(mock.last_request().is_none());
    assert!(mock.last_stream_bytes().is_none());
    assert_eq!(mock.models_fetches(), 1);
    assert_eq!(mock.streams_completed(), 1);
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    assert_eq!(mock.base_url(), format!("http://{addr}"));
    let _ = send(addr, "GET", "/v1/models", &[], b"").await;
    mock.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn binary_prints_its_address_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["--host", "127.0.0.1", "--port", "0", "--no-record"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mock-upstream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read first line");
    let url = line
        .trim_end()
        .strip_prefix("mock-upstream listening on http://")
        .expect("listening line");
    let addr: SocketAddr = url.parse().expect("HOST:PORT");
    assert_ne!(addr.port(), 0);

    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .write_all(&request_bytes(addr, "GET", "/v1/models", &[], b""))
        .expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    assert_eq!(parse_response(&raw).status, 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));

    let bad = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .arg("--port=nope")
        .stderr(Stdio::piped())
        .output()
        .expect("run with bad args");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage:"));
}

#[tokio::test]
async fn requests_are_counted_from_their_headers_to_their_answer() {
    let mock = MockUpstream::start().await;
    let res = send(mock.addr(), "GET", "/v1/models", &[], b"").await;
    assert_eq!(res.status, 200);
    assert_eq!(mock.requests_started(), 1);
    assert_eq!(mock.requests_answered(), 1);
    assert_eq!(mock.requests_abandoned(), 0);

    // Headers and part of a declared body, then silence: started, not yet answered.
    let mut cut = TcpStream::connect(mock.addr()).await.expect("connect");
    cut.write_all(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npart")
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.requests_started() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        mock.requests_started(),
        2,
        "counted before the body arrived"
    );
    assert_eq!(mock.requests_answered() + mock.requests_abandoned(), 1);
    drop(cut);

    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.requests_abandoned() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mock.requests_abandoned(), 1, "a cut-off body is abandoned");
    assert_eq!(mock.requests_answered(), 1);
    assert_eq!(
        mock.requests().len(),
        1,
        "an incomplete request is not recorded"
    );
}
