//! Reloading the clients file and the token settings: by a change of the file (written in place,
//! renamed over, a ConfigMap's symlink swap) and by `SIGHUP` to the real binary, with running
//! streams left to finish under the rules they started with.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use llm_proxy::reload::Reloader;
use serde_json::json;

use crate::clients::{chat_body, metrics, scratch_dir};
use crate::helpers::*;
use crate::process::{drain, start_binary_in};

const ALICE: &str = "[clients.alice]\ntoken = \"tok-alice\"\ntokens_per_minute = 100000\n";
const BOB: &str = "[clients.bob]\ntoken = \"tok-bob\"\n";

/// A reloader of `app` that reads `vars` where `main`'s reads the environment and `.env` files.
fn reloader(app: &TestApp, vars: &[(&str, &str)]) -> Reloader {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Reloader::new(app.state.reloadable(), Arc::new(move || Ok(vars.clone())))
}

/// The proxy with `file` as its clients file and a reloader watching it, as `main` runs one.
async fn spawn_reloading(file: &Path) -> TestApp {
    let file = file.to_str().unwrap();
    let app = spawn_app(&[("CLIENTS_FILE", file)]).await;
    let target = app.upstream.base_url();
    let reloader = reloader(
        &app,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("ALLOWED_TOKENS", CLIENT_TOKEN),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("CLIENTS_FILE", file),
        ],
    );
    tokio::spawn(reloader.run());
    app
}

/// Sends a chat as `token` until it gets `status`; how long that took.
async fn until_status(app: &TestApp, token: &str, status: u16) -> Duration {
    let started = std::time::Instant::now();
    let got = eventually(Duration::from_secs(5), async || {
        app.chat(token, chat_body("gpt-mock")).await.status() == status
    })
    .await;
    if !got {
        panic!("{token} never got {status}");
    }
    started.elapsed()
}

fn stream_as(app: &TestApp, token: &str) -> reqwest::RequestBuilder {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("x-mock-chunks", "20")
        .header("x-mock-interval-ms", "50")
        .json(&json!({"model": "gpt-mock", "stream": true, "stream_options": {"include_usage": true}}))
}

#[tokio::test]
async fn a_file_written_in_place_or_renamed_over_applies_within_two_seconds() {
    let file = scratch_dir("reload-file").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let app = spawn_reloading(&file).await;
    assert_eq!(
        app.chat("tok-bob", chat_body("gpt-mock")).await.status(),
        401
    );

    std::fs::write(&file, format!("{ALICE}{BOB}")).unwrap();
    assert!(until_status(&app, "tok-bob", 200).await < Duration::from_secs(2));

    // A stream of alice runs while alice is removed by a file renamed over the old one.
    let running = stream_as(&app, "tok-alice").send().await.unwrap();
    assert_eq!(running.status(), 200);
    let mut body = running.bytes_stream();
    let mut streamed = body.next().await.unwrap().unwrap().to_vec();
    let replacement = file.with_extension("new");
    std::fs::write(&replacement, BOB).unwrap();
    std::fs::rename(&replacement, &file).unwrap();
    assert!(until_status(&app, "tok-alice", 401).await < Duration::from_secs(2));
    assert_eq!(app.upstream.streams_completed(), 0, "still streaming");
    while let Some(chunk) = body.next().await {
        streamed.extend_from_slice(&chunk.expect("the stream is not cut by the reload"));
    }
    assert!(streamed.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        app.chat("tok-bob", chat_body("gpt-mock")).await.status(),
        200
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_is_seen() {
    {
        use std::os::unix::fs::symlink;
        let dir = scratch_dir("reload-configmap");
        // What the kubelet lays out: a timestamped directory, `..data` pointing at it, and the
        // file as a link through `..data`.
        std::fs::create_dir(dir.join("..2026_12_01_12_00_00.1")).unwrap();
        std::fs::write(dir.join("..2026_12_01_12_00_00.1/clients.toml"), ALICE).unwrap();
        symlink("..2026_12_01_12_00_00.1", dir.join("..data")).unwrap();
        symlink("..data/clients.toml", dir.join("clients.toml")).unwrap();
        let app = spawn_reloading(&dir.join("clients.toml")).await;
        assert_eq!(
            app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
            200
        );

        // An update: a new directory, a new link renamed over `..data`, the old one removed.
        std::fs::create_dir(dir.join("..2026_12_01_12_05_00.2")).unwrap();
        std::fs::write(dir.join("..2026_12_01_12_05_00.2/clients.toml"), BOB).unwrap();
        symlink("..2026_12_01_12_05_00.2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..2026_12_01_12_00_00.1")).unwrap();

        assert!(until_status(&app, "tok-bob", 200).await < Duration::from_secs(2));
        assert_eq!(
            app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
            401
        );
    }
}

#[tokio::test]
async fn a_broken_file_is_rejected_whole_and_counted() {
    let file = scratch_dir("reload-broken").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let app = spawn_reloading(&file).await;
    // Valid TOML with one bad field: nothing of it applies, not even the new client.
    std::fs::write(
        &file,
        format!("{BOB}[clients.carol]\ntoken = \"tok-carol\"\nrequests_per_minute = -1\n"),
    )
    .unwrap();
    let failed = "llm_proxy_config_reloads_total{result=\"failed\"} 1";
    let seen = eventually(Duration::from_secs(3), async || {
        metrics(&app).await.contains(failed)
    })
    .await;
    assert!(seen, "{}", metrics(&app).await);
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(
        app.chat("tok-bob", chat_body("gpt-mock")).await.status(),
        401
    );

    std::fs::write(&file, BOB).unwrap();
    assert!(until_status(&app, "tok-bob", 200).await < Duration::from_secs(2));
    let after = metrics(&app).await;
    assert!(
        after.contains("llm_proxy_config_reloads_total{result=\"ok\"} 1"),
        "{after}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_tokens_while_a_removed_clients_stream_runs_to_its_end() {
    let upstream = mock_upstream::MockUpstream::start().await;
    let target = upstream.base_url();
    let dir = scratch_dir("reload-sighup");
    std::fs::write(dir.join(".env"), "ALLOWED_TOKENS=carol:tok-carol\n").unwrap();
    let mut proxy = start_binary_in(
        &dir,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("AUTH_VALIDATION", "true"),
        ],
    )
    .await;
    let url = proxy.url("/v1/chat/completions");
    let client = reqwest::Client::new();
    let chat = |token: &'static str| {
        client
            .post(&url)
            .bearer_auth(token)
            .json(&chat_body("gpt-mock"))
            .send()
    };
    let running = client
        .post(&url)
        .bearer_auth("tok-carol")
        .header("x-mock-chunks", "20")
        .header("x-mock-interval-ms", "50")
        .json(&json!({"model": "gpt-mock", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    let mut body = running.bytes_stream();
    let mut streamed = body.next().await.unwrap().unwrap().to_vec();

    async fn line_with(proxy: &mut RunningProxy, wanted: &[&str]) -> String {
        let found = proxy.log_line_with(wanted, Duration::from_secs(2)).await;
        found.unwrap_or_else(|| panic!("no line with {wanted:?}: {}", drain(&mut proxy.log)))
    }

    // A bad .env is rejected whole: carol keeps her access, and the error names the problem.
    std::fs::write(
        dir.join(".env"),
        "ALLOWED_TOKENS=dave:tok-dave\nLOG_LEVEL=loud\n",
    )
    .unwrap();
    proxy.signal("-HUP");
    let rejected = line_with(&mut proxy, &["reload (SIGHUP) rejected", "LOG_LEVEL"]).await;
    assert!(!rejected.contains("tok-dave"), "{rejected}");
    assert_eq!(chat("tok-carol").await.unwrap().status(), 200);
    assert_eq!(chat("tok-dave").await.unwrap().status(), 401);

    std::fs::write(dir.join(".env"), "ALLOWED_TOKENS=dave:tok-dave\n").unwrap();
    proxy.signal("-HUP");
    line_with(&mut proxy, &["reloaded (SIGHUP): 1 clients"]).await;

    assert_eq!(chat("tok-carol").await.unwrap().status(), 401);
    assert_eq!(chat("tok-dave").await.unwrap().status(), 200);
    while let Some(chunk) = body.next().await {
        streamed.extend_from_slice(&chunk.expect("the stream is not cut by SIGHUP"));
    }
    assert!(streamed.ends_with(b"data: [DONE]\n\n"));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "SIGHUP never ends the process"
    );

    proxy.terminate();
    let status = proxy.child.wait().await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_new_clients_file_path_waits_for_a_restart_while_the_rest_reloads() {
    let dir = scratch_dir("reload-path");
    std::fs::write(dir.join("first.toml"), ALICE).unwrap();
    std::fs::write(dir.join("second.toml"), BOB).unwrap();
    let app = spawn_app(&[("CLIENTS_FILE", dir.join("first.toml").to_str().unwrap())]).await;
    let target = app.upstream.base_url();
    let second = dir.join("second.toml").display().to_string();
    let mut reloader = reloader(
        &app,
        &[
            ("TARGET_HOST", &target),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("ALLOWED_TOKENS", "erin:tok-erin"),
            ("CLIENTS_FILE", &second),
        ],
    );
    assert!(reloader.reload("test"));
    // ALLOWED_TOKENS changed; the clients still come from the file being watched.
    assert_eq!(
        app.chat("tok-erin", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        401
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(
        app.chat("tok-bob", chat_body("gpt-mock")).await.status(),
        401
    );
}

/// A TCP relay to `upstream` that counts the connections the proxy opens through it.
async fn counting_relay(upstream: std::net::SocketAddr) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (format!("http://{address}"), accepted)
}

#[tokio::test]
async fn a_reload_keeps_the_upstream_connections_warm() {
    let upstream = mock_upstream::MockUpstream::start().await;
    let (relay, accepted) = counting_relay(upstream.addr()).await;
    let file = scratch_dir("reload-pool").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let app = spawn_app_in_front_of(
        upstream,
        ("TARGET_HOST", &relay),
        &[("CLIENTS_FILE", file.to_str().unwrap())],
    )
    .await;
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Only a client's limit changes: the reload applies it and leaves the pool alone.
    std::fs::write(
        &file,
        "[clients.alice]\ntoken = \"tok-alice\"\nrequests_per_minute = 1\n",
    )
    .unwrap();
    let mut reloader = reloader(
        &app,
        &[
            ("TARGET_HOST", &relay),
            ("AUTH_BEARER", UPSTREAM_KEY),
            ("ALLOWED_TOKENS", CLIENT_TOKEN),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("CLIENTS_FILE", file.to_str().unwrap()),
        ],
    );
    assert!(reloader.reload("test"));
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200
    );
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        429,
        "the new limit is in force"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the requests after the reload went on the connection opened before it"
    );
}

#[tokio::test]
async fn an_emptied_file_is_rejected_and_the_clients_stay_unless_it_says_allow_empty() {
    let file = scratch_dir("reload-empty").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let app = spawn_reloading(&file).await;
    // A truncated write, as a failed deploy can leave it.
    std::fs::write(&file, "").unwrap();
    let failed = "llm_proxy_config_reloads_total{result=\"failed\"} 1";
    let mut seen = false;
    for _ in 0..200 {
        if metrics(&app).await.contains(failed) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "{}", metrics(&app).await);
    assert_eq!(
        app.chat("tok-alice", chat_body("gpt-mock")).await.status(),
        200,
        "alice stays"
    );

    // Meant: every client of the file goes; ALLOWED_TOKENS entries stay.
    std::fs::write(&file, "allow_empty = true\n").unwrap();
    assert!(until_status(&app, "tok-alice", 401).await < Duration::from_secs(2));
    assert_eq!(
        app.chat(CLIENT_TOKEN, chat_body("gpt-mock")).await.status(),
        200
    );
    let after = metrics(&app).await;
    assert!(
        after.contains("llm_proxy_config_reloads_total{result=\"ok\"} 1"),
        "{after}"
    );
}

/// The binary with `file` as its clients file, its missing-file line repeated every 300 ms.
async fn start_watching(
    file: &Path,
) -> (mock_upstream::MockUpstream, crate::process::RunningProxy) {
    let (upstream, proxy) = crate::process::start_binary_with_mock(&[
        ("CLIENTS_FILE", file.to_str().unwrap()),
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("LLM_PROXY_TEST_CLIENTS_FILE_REPEAT_MS", "300"),
    ])
    .await;
    (upstream, proxy)
}

/// The next log line with every one of `wanted` in it, within `within`.
async fn next_line_with(
    proxy: &mut crate::process::RunningProxy,
    wanted: &[&str],
    within: Duration,
) -> String {
    let found = tokio::time::timeout(within, async {
        loop {
            let line = proxy.log.recv().await.expect("the proxy exited");
            if wanted.iter().all(|part| line.contains(part)) {
                return line;
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no line with {wanted:?}: {}", drain(&mut proxy.log)))
}

async fn missing_gauge(proxy: &crate::process::RunningProxy) -> f64 {
    let text = reqwest::Client::new()
        .get(proxy.url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("llm_proxy_clients_file_missing "))
        .unwrap_or_else(|| panic!("no llm_proxy_clients_file_missing in {text}"))
        .parse()
        .unwrap()
}

async fn chat_status(proxy: &crate::process::RunningProxy, token: &str) -> u16 {
    reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(&chat_body("gpt-mock"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_deleted_file_keeps_the_clients_and_is_reported_until_it_is_back() {
    let file = scratch_dir("reload-deleted").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let (_upstream, mut proxy) = start_watching(&file).await;
    assert_eq!(missing_gauge(&proxy).await, 0.0);

    std::fs::remove_file(&file).unwrap();
    let said = ["CLIENTS_FILE", "cannot be read", "stay in force"];
    let first = next_line_with(&mut proxy, &said, Duration::from_secs(5)).await;
    assert!(first.contains("ERROR"), "{first}");
    assert_eq!(missing_gauge(&proxy).await, 1.0);
    assert_eq!(chat_status(&proxy, "tok-alice").await, 200, "alice stays");
    // Said again while it is missing (every minute; every 300 ms by the test knob).
    next_line_with(&mut proxy, &said, Duration::from_secs(3)).await;
    next_line_with(&mut proxy, &said, Duration::from_secs(3)).await;

    // Back with another client: loaded as it is now.
    std::fs::write(&file, BOB).unwrap();
    next_line_with(&mut proxy, &["is back"], Duration::from_secs(5)).await;
    next_line_with(
        &mut proxy,
        &["reloaded (clients file is back): 1 clients"],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(missing_gauge(&proxy).await, 0.0);
    assert_eq!(chat_status(&proxy, "tok-bob").await, 200);
    assert_eq!(chat_status(&proxy, "tok-alice").await, 401);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = drain(&mut proxy.log);
    assert!(
        !after.contains("cannot be read"),
        "the error stops once the file is back: {after}"
    );
}

#[tokio::test]
async fn a_file_gone_for_a_moment_is_not_reported_as_missing() {
    let file = scratch_dir("reload-moment").join("clients.toml");
    std::fs::write(&file, ALICE).unwrap();
    let (_upstream, mut proxy) = start_watching(&file).await;
    // What a ConfigMap update or an editor's save may do: the entry removed and made again.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&file, ALICE).unwrap();
    // Well past the grace and several of the knob's repeats.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = drain(&mut proxy.log);
    assert!(
        !log.contains("cannot be read") && !log.contains("is back"),
        "{log}"
    );
    assert_eq!(missing_gauge(&proxy).await, 0.0);
    assert_eq!(chat_status(&proxy, "tok-alice").await, 200);
}

/// The `llm_proxy_client_budget_usd` lines of `/metrics`, sorted.
async fn budget_series(app: &TestApp) -> Vec<String> {
    let mut lines: Vec<String> = app
        .metrics_text()
        .await
        .lines()
        .filter(|line| line.starts_with("llm_proxy_client_budget_usd{"))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn the_budget_gauge_follows_the_clients_file_through_a_reload() {
    let file = scratch_dir("reload-budget-gauge").join("clients.toml");
    std::fs::write(
        &file,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 20\nusd_per_month = 400.5\n\
         [clients.bob]\ntoken = \"tok-bob\"\nusd_per_month = 100\n\
         [clients.carol]\ntoken = \"tok-carol\"\ntokens_per_day = 1000\n",
    )
    .unwrap();
    let app = spawn_reloading(&file).await;
    assert_eq!(
        budget_series(&app).await,
        [
            "llm_proxy_client_budget_usd{client=\"alice\",period=\"day\"} 20.0",
            "llm_proxy_client_budget_usd{client=\"alice\",period=\"month\"} 400.5",
            "llm_proxy_client_budget_usd{client=\"bob\",period=\"month\"} 100.0",
        ]
    );

    // alice loses her monthly budget, bob leaves, carol gains a daily one.
    std::fs::write(
        &file,
        "[clients.alice]\ntoken = \"tok-alice\"\nusd_per_day = 25\n\
         [clients.carol]\ntoken = \"tok-carol\"\nusd_per_day = 0.5\n",
    )
    .unwrap();
    let wanted = [
        "llm_proxy_client_budget_usd{client=\"alice\",period=\"day\"} 25.0",
        "llm_proxy_client_budget_usd{client=\"carol\",period=\"day\"} 0.5",
    ];
    let seen = eventually(Duration::from_secs(5), async || {
        budget_series(&app).await == wanted
    })
    .await;
    assert!(seen, "{:?}", budget_series(&app).await);
}
