//! The binary in production: its command line, listen addresses, open-file limits, start-up
//! warnings, and the access line of a WebSocket tunnel.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mock_upstream::MockUpstream;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::process::{run_with, start_binary, start_binary_with_mock};

fn run_args(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    Proxy::new().envs(vars).run(args)
}

#[test]
fn help_lists_every_variable_and_needs_no_configuration() {
    let output = run_args(&["--help"], &[]);
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "TARGET_HOST",
        "AUTH_BEARER",
        "PROXY_HOST",
        "PROXY_PORT",
        "MAX_CONCURRENT_REQUESTS",
        "STREAM_IDLE_TIMEOUT_SECS",
    ] {
        assert!(help.contains(variable), "{variable} missing from:\n{help}");
    }
    assert!(
        help.contains("PROXY_PORT") && help.contains("[default: 8080]"),
        "{help}"
    );
    assert!(help.contains("healthcheck"), "{help}");
}

#[test]
fn version_prints_the_name_and_version() {
    let output = run_args(&["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("llm-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_unknown_argument_is_an_error_and_starts_nothing() {
    let output = run_args(&["--port=80"], &[("AUTH_BEARER", "k")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--port=80") && stderr.contains("--help"),
        "{stderr}"
    );
}

#[test]
fn a_listen_address_that_is_not_an_ip_stops_start_up_naming_proxy_host() {
    let output = run_with(&[("AUTH_BEARER", "k"), ("PROXY_HOST", "localhost")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PROXY_HOST"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn healthcheck_exits_zero_for_a_running_proxy_and_one_for_a_stopped_one() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[]).await;
    let port = proxy.port.to_string();
    let check = |port: String| {
        tokio::task::spawn_blocking(move || run_args(&["healthcheck"], &[("PROXY_PORT", &port)]))
    };
    let healthy = check(port.clone()).await.unwrap();
    assert_eq!(healthy.status.code(), Some(0), "{healthy:?}");

    proxy.terminate();
    proxy.child.wait().await.unwrap();
    let stopped = check(port).await.unwrap();
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("unhealthy"));
}

#[tokio::test]
async fn a_misspelt_variable_is_warned_about_naming_the_one_meant() {
    let (_upstream, mut proxy) = start_binary_with_mock(&[("AUTH_VALIDATON", "true")]).await;
    proxy.terminate();
    proxy.child.wait().await.unwrap();
    let log = proxy.startup_log.clone();
    assert!(
        log.contains("AUTH_VALIDATON is not a setting of this proxy and is ignored; did you mean AUTH_VALIDATION?"),
        "{log}"
    );
    assert!(
        log.contains("AUTH_VALIDATION is off and PROXY_HOST=0.0.0.0 is not loopback-only"),
        "{log}"
    );
}

async fn status_at(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    Some(client.get(url).send().await.ok()?.status().as_u16())
}

#[tokio::test]
async fn each_listen_address_takes_exactly_its_own_families() {
    // (PROXY_HOST, answers on 127.0.0.1, answers on ::1)
    let cases = [
        ("127.0.0.1", true, false),
        ("::1", false, true),
        ("::", true, true),
    ];
    for (host, ipv4, ipv6) in cases {
        let (_upstream, proxy) = start_binary_with_mock(&[("PROXY_HOST", host)]).await;
        assert_eq!(proxy.addr.ip().to_string(), host);
        let port = proxy.port;
        let expect = |answers: bool| answers.then_some(200);
        assert_eq!(
            status_at(&format!("http://127.0.0.1:{port}/healthz")).await,
            expect(ipv4),
            "{host} over IPv4"
        );
        assert_eq!(
            status_at(&format!("http://[::1]:{port}/healthz")).await,
            expect(ipv6),
            "{host} over IPv6"
        );
    }
}

/// The binary with its open-file limits set to `soft`/`hard` before it runs.
async fn start_with_file_limit(soft: u64, hard: u64, vars: &[(&str, &str)]) -> RunningProxy {
    Proxy::new()
        .envs(vars)
        .file_limit(soft, hard)
        .start_binary()
        .await
}

/// Streams `count` chats at once through `proxy`, each held open about two seconds by the mock;
/// returns every status (and body, for refusals).
async fn concurrent_streams(proxy: &RunningProxy, count: usize) -> Vec<(u16, String)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let requests = (0..count).map(|_| {
        let request = client
            .post(proxy.url("/v1/chat/completions"))
            .header("x-mock-chunks", "4")
            .header("x-mock-interval-ms", "500")
            .json(&serde_json::json!({"stream": true}))
            .send();
        async move {
            let response = request.await.expect("the proxy answers every request");
            let status = response.status().as_u16();
            let body = response.text().await.expect("the answer arrives whole");
            (status, body)
        }
    });
    futures::future::join_all(requests).await
}

async fn local_limit_failures(proxy: &RunningProxy) -> (f64, f64) {
    let text = reqwest::get(proxy.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |series: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    };
    (
        sample(r#"llm_proxy_upstream_failures_total{kind="local_limit"}"#),
        sample(r#"llm_proxy_upstream_failures_total{kind="connect"}"#),
    )
}

fn raise_own_file_limit() {
    // 1500 client connections and the 1500 the mock accepts live in this process.
    rlimit::increase_nofile_limit(8192).expect("the test process can raise its own limit");
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert!(
        soft >= 4096,
        "this test needs 4096 open files, the hard limit allows {soft}"
    );
}

#[tokio::test]
async fn fifteen_hundred_streams_complete_under_a_soft_limit_of_1024() {
    raise_own_file_limit();
    let upstream = MockUpstream::start_without_recording_on("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let target = upstream.base_url();
    let proxy = start_with_file_limit(
        1024,
        8192,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("MAX_CONCURRENT_REQUESTS", "2000"),
        ],
    )
    .await;
    let answers = concurrent_streams(&proxy, 1500).await;
    let complete = answers
        .iter()
        .filter(|(status, body)| *status == 200 && body.ends_with("data: [DONE]\n\n"))
        .count();
    assert_eq!(
        complete,
        1500,
        "{:?}",
        answers.iter().find(|(s, _)| *s != 200)
    );
    let log = proxy.startup_log.clone();
    assert!(
        log.contains("open-file limit: 8192 (raised from 1024)"),
        "{log}"
    );
}

#[tokio::test]
async fn a_limit_already_at_the_hard_one_is_stated_not_said_to_be_raised() {
    let proxy = start_with_file_limit(2048, 2048, &[("AUTH_BEARER", UPSTREAM_KEY)]).await;
    let line = proxy
        .startup_log
        .lines()
        .find(|line| line.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no open-file limit line: {}", proxy.startup_log))
        .to_string();
    assert!(line.ends_with("open-file limit: 2048"), "{line}");
    assert!(!line.contains("raised"), "{line}");
}

#[tokio::test]
async fn out_of_descriptors_is_503_overloaded_never_502_and_the_proxy_recovers() {
    raise_own_file_limit();
    let upstream = MockUpstream::start_without_recording_on("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let target = upstream.base_url();
    let mut proxy = start_with_file_limit(
        1024,
        1024,
        &[("TARGET_HOST", &target), ("AUTH_BEARER", UPSTREAM_KEY)],
    )
    .await;
    let answers = concurrent_streams(&proxy, 1500).await;
    let mut refused = 0;
    for (status, body) in &answers {
        match status {
            200 => assert!(body.ends_with("data: [DONE]\n\n"), "{body}"),
            503 => {
                let error: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(error["error"], "overloaded", "{body}");
                refused += 1;
            }
            other => panic!("status {other}: {body}"),
        }
    }
    // 1500 callers and an upstream connection for each cannot fit in 1024 descriptors.
    assert!(refused > 0, "the limit was never reached");
    let (local_limit, connect) = local_limit_failures(&proxy).await;
    assert_eq!(connect, 0.0, "the upstream was never blamed");
    assert_eq!(
        local_limit, refused as f64,
        "each refusal was counted as a local limit"
    );
    let after = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        after.status(),
        200,
        "the proxy serves normally after the burst"
    );
    let log = format!("{}{}", proxy.startup_log, drain(&mut proxy.log));
    assert!(
        log.contains("the open-file limit 1024 is too low for MAX_CONCURRENT_REQUESTS=1024"),
        "{log}"
    );
    assert!(log.contains("out of file descriptors"), "{log}");
}

#[tokio::test]
async fn a_tunnel_gets_one_access_line_with_its_bytes_each_way() {
    let echo = crate::websocket::spawn_echo_upstream().await;
    let mut proxy =
        start_binary(&[("TARGET_HOST", &echo.target), ("AUTH_BEARER", UPSTREAM_KEY)]).await;
    let url = format!("ws://127.0.0.1:{}/v1/realtime?model=m", proxy.port);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    socket.send(Message::binary(vec![7u8; 1000])).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::binary(vec![7u8; 1000])
    );
    socket.close(None).await.unwrap();
    while socket.next().await.is_some() {}

    let line = proxy
        .log_line_with(&["GET /v1/realtime status=101"], Duration::from_secs(5))
        .await
        .expect("an access line for the tunnel");
    let field = |name: &str| -> u64 {
        let (_, rest) = line.split_once(&format!("{name}=")).unwrap();
        rest.split(' ').next().unwrap().parse().unwrap()
    };
    // A 1000-byte binary frame from a client is 1008 bytes on the wire (2 + 2 length + 4 mask),
    // from a server 1004 (no mask); both sides' close frames add a little more.
    assert!((1008..1100).contains(&field("bytes_in")), "{line}");
    assert!((1004..1100).contains(&field("bytes_out")), "{line}");
    assert!(line.contains("outcome=closed"), "{line}");
}
